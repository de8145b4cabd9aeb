"""GPU instance types the AWS stack knows: GPUs per instance and EFA interfaces it takes.

A GPU node group must use one of these, so a typo or a CPU type fails before anything is
created. The EFA figure is the number of network cards (one EFA interface each); 0 means the
type has no EFA support and its nodes get one ordinary interface.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInstanceType:
    gpus: int
    efa_interfaces: int
    gpu_model: str


GPU_INSTANCE_TYPES: dict[str, GpuInstanceType] = {
    "p5.48xlarge": GpuInstanceType(8, 32, "H100"),
    "p5e.48xlarge": GpuInstanceType(8, 32, "H200"),
    "p5en.48xlarge": GpuInstanceType(8, 16, "H200"),
    "p4d.24xlarge": GpuInstanceType(8, 4, "A100 40GB"),
    "p4de.24xlarge": GpuInstanceType(8, 4, "A100 80GB"),
    "g6.48xlarge": GpuInstanceType(8, 1, "L4"),
    "g5.48xlarge": GpuInstanceType(8, 1, "A10G"),
    "g6.12xlarge": GpuInstanceType(4, 0, "L4"),
    "g5.12xlarge": GpuInstanceType(4, 0, "A10G"),
    "g6.xlarge": GpuInstanceType(1, 0, "L4"),
    "g5.xlarge": GpuInstanceType(1, 0, "A10G"),
}

GPU_FAMILIES = sorted({name.split(".")[0] for name in GPU_INSTANCE_TYPES})


def gpu_instance_type(name: str, where: str) -> GpuInstanceType:
    """The type's figures, or a StackConfigError that names the known types."""
    from stacks.errors import StackConfigError

    found = GPU_INSTANCE_TYPES.get(name)
    if found is not None:
        return found
    family = name.split(".")[0]
    if family in GPU_FAMILIES:
        sizes = ", ".join(t for t in GPU_INSTANCE_TYPES if t.startswith(family + "."))
        hint = f"known {family} sizes: {sizes}"
    else:
        hint = f"{family!r} is not a GPU family this stack knows ({', '.join(GPU_FAMILIES)})"
    raise StackConfigError(
        f"{where}: instance type {name!r} is not a known GPU instance type; {hint}. "
        f"Pick one of: {', '.join(GPU_INSTANCE_TYPES)}"
    )
