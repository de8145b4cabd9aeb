"""Give each GPU-using process of a graph its own devices (``CUDA_VISIBLE_DEVICES``).

A service asks with ``resources: {gpu: N}``; each of its worker processes gets the next N
devices of this node. Nothing is set where the node has no NVIDIA GPU (the mocker's
``gpu: 1`` then means nothing) or where the user already chose ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from servegrid.distributed.env import CUDA_VISIBLE_DEVICES


def detect_gpu_count() -> int:
    """GPUs ``nvidia-smi -L`` lists here; 0 without the driver."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return 0
    try:
        listing = subprocess.run(
            [binary, "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def allocate(requests: list[tuple[str, int]], available: int) -> tuple[dict[str, str], list[str]]:
    """Device lists for ``(label, gpus)`` in order, and warnings.

    Devices are handed out in sequence; when the graph asks for more than the node has,
    allocation wraps around (processes then share devices) and a warning says so.
    """
    assignment: dict[str, str] = {}
    warnings: list[str] = []
    if available <= 0:
        return assignment, warnings
    wanted = sum(n for _, n in requests)
    if wanted > available:
        warnings.append(
            f"the graph asks for {wanted} GPUs and this node has {available}: "
            "processes will share devices (lower ServiceArgs.workers or resources.gpu)"
        )
    cursor = 0
    for label, count in requests:
        if count <= 0:
            continue
        devices = [(cursor + i) % available for i in range(count)]
        cursor += count
        assignment[label] = ",".join(str(d) for d in devices)
    return assignment, warnings


def user_chose_devices() -> bool:
    return CUDA_VISIBLE_DEVICES in os.environ
