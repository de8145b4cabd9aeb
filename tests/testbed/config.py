"""Settings of one testbed: where it keeps its files, what it names things, which subnet it uses.

Every value has a default and an environment override, so the CLI, the pytest fixture and the
molecule playbooks all agree on the same testbed without passing flags around. Two testbeds
can coexist on one host when they differ in state dir, prefix and subnet.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = "/var/cache/servegrid-testbed"
DEFAULT_STATE = "/run/servegrid-testbed"
DEFAULT_SUBNET = "10.213.0.0/24"
DEFAULT_PREFIX = "sgtb"
DEFAULT_RELEASE = "bookworm"

# Host offsets inside the subnet: .1 is the bridge, nodes start at .11 so node N is .(10+N).
BRIDGE_HOST = 1
NODE_HOST_OFFSET = 10


_DEFAULT_NETWORK = ipaddress.IPv4Network(DEFAULT_SUBNET)


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def _env_list(name: str) -> tuple[str, ...]:
    raw = os.environ.get(name, "")
    return tuple(p for p in raw.replace(",", " ").split() if p)


@dataclass(frozen=True)
class TestbedConfig:
    """One testbed's names and paths; build with `TestbedConfig.from_env()`."""

    __test__ = False  # not a pytest test class despite the name

    cache_dir: Path = Path(DEFAULT_CACHE)
    state_dir: Path = Path(DEFAULT_STATE)
    subnet: ipaddress.IPv4Network = _DEFAULT_NETWORK
    prefix: str = DEFAULT_PREFIX
    release: str = DEFAULT_RELEASE
    extra_packages: tuple[str, ...] = ()
    wheelhouse: Path | None = None
    boot_timeout_s: float = 180.0
    stop_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, **overrides: object) -> TestbedConfig:
        """Defaults, then SERVEGRID_TESTBED_* variables, then keyword overrides."""
        wheelhouse = os.environ.get("SERVEGRID_TESTBED_WHEELHOUSE")
        values: dict[str, object] = {
            "cache_dir": _env_path("SERVEGRID_TESTBED_CACHE", DEFAULT_CACHE),
            "state_dir": _env_path("SERVEGRID_TESTBED_STATE", DEFAULT_STATE),
            "subnet": os.environ.get("SERVEGRID_TESTBED_SUBNET") or DEFAULT_SUBNET,
            "prefix": os.environ.get("SERVEGRID_TESTBED_PREFIX") or DEFAULT_PREFIX,
            "release": os.environ.get("SERVEGRID_TESTBED_RELEASE") or DEFAULT_RELEASE,
            "extra_packages": _env_list("SERVEGRID_TESTBED_EXTRA_PACKAGES"),
            "wheelhouse": Path(wheelhouse) if wheelhouse else None,
        }
        values.update(overrides)
        subnet = values["subnet"]
        if not isinstance(subnet, ipaddress.IPv4Network):
            try:
                values["subnet"] = ipaddress.IPv4Network(str(subnet))
            except ValueError as exc:
                raise ValueError(
                    f"SERVEGRID_TESTBED_SUBNET={subnet!r} is not an IPv4 network "
                    "(want e.g. 10.213.0.0/24)"
                ) from exc
        for key in ("cache_dir", "state_dir"):
            values[key] = Path(str(values[key])).absolute()
        prefix = str(values["prefix"])
        # Interface names are limited to 15 bytes: "<prefix>-node<NN>" must fit.
        if not prefix.isalnum() or len(prefix) > 6:
            raise ValueError(
                f"SERVEGRID_TESTBED_PREFIX={prefix!r}: use 1-6 letters/digits (it names "
                "the bridge, network namespaces and veth links)"
            )
        return cls(**values)  # type: ignore[arg-type]

    @property
    def bridge(self) -> str:
        return f"{self.prefix}0"

    @property
    def bridge_ip(self) -> str:
        return str(self.subnet.network_address + BRIDGE_HOST)

    @property
    def max_nodes(self) -> int:
        return self.subnet.num_addresses - NODE_HOST_OFFSET - 2

    def node_name(self, index: int) -> str:
        return f"node{index}"

    def node_ip(self, index: int) -> str:
        return str(self.subnet.network_address + NODE_HOST_OFFSET + index)

    def netns(self, name: str) -> str:
        """Name of the network namespace (and of the host-side veth) of node `name`."""
        return f"{self.prefix}-{name}"

    @property
    def inventory_path(self) -> Path:
        return self.state_dir / "inventory.ini"

    @property
    def key_path(self) -> Path:
        return self.state_dir / "id_ed25519"
