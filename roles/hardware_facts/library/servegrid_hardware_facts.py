#!/usr/bin/python
"""Ansible module: what GPU and RDMA hardware a host has, read from sysfs and /dev only.

Reads PCI functions (/sys/bus/pci/devices/*/{vendor,class}), NVIDIA device nodes
(/dev/nvidia[0-9]*, /dev/nvidia-nvswitch*), the loaded NVIDIA kernel module's version and every
RDMA device under /sys/class/infiniband with its ports' state, link layer, rate and net devices.
No lspci, no nvidia-smi: it answers the same on a bare host, a host without drivers and a test
node, and changes nothing (check mode is the same run).
"""

from __future__ import annotations

import re
from pathlib import Path

DOCUMENTATION = r"""
module: servegrid_hardware_facts
short_description: Detect NVIDIA GPUs, NVSwitches and RDMA devices from sysfs
description:
  - Sets the fact C(servegrid_hardware) with GPUs and NVSwitches found on the PCI bus, NVIDIA
    device nodes, the loaded NVIDIA driver version and RDMA devices with their ports.
options:
  sys_root:
    description: Where sysfs is mounted (a fake tree for tests).
    type: path
    default: /sys
  dev_root:
    description: Where device nodes live (a fake tree for tests).
    type: path
    default: /dev
author: servegrid
"""

NVIDIA_VENDOR = "0x10de"
# PCI class codes (class, subclass): VGA and 3D controllers are GPUs; NVSwitch shows up as a
# bridge of subclass "other" (0x0680) from NVIDIA.
GPU_CLASSES = ("0x0300", "0x0302")
NVSWITCH_CLASS = "0x0680"
PORT_STATE = re.compile(r"^\s*\d+:\s*(\S+)")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _pci_functions(sys_root: Path) -> list[dict[str, str]]:
    devices = []
    base = sys_root / "bus" / "pci" / "devices"
    if not base.is_dir():
        return devices
    for dev in sorted(base.iterdir()):
        vendor = (_read(dev / "vendor") or "").lower()
        pci_class = (_read(dev / "class") or "").lower()
        device_id = (_read(dev / "device") or "").lower()
        devices.append(
            {"address": dev.name, "vendor": vendor, "class": pci_class, "device": device_id}
        )
    return devices


def _dev_nodes(dev_root: Path, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    if not dev_root.is_dir():
        return []
    return sorted(str(dev_root / p.name) for p in dev_root.iterdir() if regex.fullmatch(p.name))


def _rdma_devices(sys_root: Path) -> list[dict]:
    base = sys_root / "class" / "infiniband"
    if not base.is_dir():
        return []
    devices = []
    for dev in sorted(base.iterdir()):
        ports = []
        ports_dir = dev / "ports"
        if ports_dir.is_dir():
            for port in sorted(
                ports_dir.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0
            ):
                state_raw = _read(port / "state") or ""
                match = PORT_STATE.match(state_raw)
                ports.append(
                    {
                        "port": int(port.name) if port.name.isdigit() else port.name,
                        "state": match.group(1) if match else (state_raw or "UNKNOWN"),
                        "link_layer": _read(port / "link_layer") or "unknown",
                        "rate": _read(port / "rate") or "",
                    }
                )
        net_dir = dev / "device" / "net"
        netdevs = sorted(p.name for p in net_dir.iterdir()) if net_dir.is_dir() else []
        devices.append({"name": dev.name, "ports": ports, "netdevs": netdevs})
    return devices


def _driver_version(sys_root: Path) -> str | None:
    return _read(sys_root / "module" / "nvidia" / "version")


def report_lines(facts: dict) -> list[str]:
    """The preflight table's rows for one host: label, then what was found."""
    gpu_nodes = facts["gpu_device_nodes"]
    switch_nodes = facts["nvswitch_device_nodes"]
    rows = [
        (
            "GPUs",
            f"{facts['gpu_count']} on PCI (vendor 10de), "
            + (f"{len(gpu_nodes)} /dev/nvidiaN" if gpu_nodes else "no /dev/nvidiaN"),
        ),
        ("driver", facts["nvidia_driver_loaded"] or "not loaded"),
        (
            "NVSwitch",
            f"{facts['nvswitch_count']} on PCI, "
            + (
                f"{len(switch_nodes)} /dev/nvidia-nvswitchN"
                if switch_nodes
                else "no /dev/nvidia-nvswitchN"
            ),
        ),
        ("RDMA devices", ", ".join(d["name"] for d in facts["rdma_devices"]) or "none"),
        ("link layers", ", ".join(facts["rdma_link_layers"]) or "-"),
    ]
    for dev in facts["rdma_devices"]:
        netdevs = f" ({','.join(dev['netdevs'])})" if dev["netdevs"] else ""
        for port in dev["ports"]:
            rate = f", {port['rate']}" if port["rate"] else ""
            rows.append(
                (
                    f"{dev['name']}/{port['port']}",
                    f"{port['state']}, {port['link_layer']}{rate}{netdevs}",
                )
            )
    return [f"{label:<14} {value}" for label, value in rows]


def scan(sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> dict:
    """Everything the provisioning roles need to know about this host's hardware."""
    pci = _pci_functions(sys_root)
    nvidia = [d for d in pci if d["vendor"] == NVIDIA_VENDOR]
    gpus = [d for d in nvidia if d["class"][:6] in GPU_CLASSES]
    nvswitches = [d for d in nvidia if d["class"][:6] == NVSWITCH_CLASS]
    rdma = _rdma_devices(sys_root)
    facts = {
        "gpu_count": len(gpus),
        "gpus": [{"address": d["address"], "device": d["device"]} for d in gpus],
        "gpu_device_nodes": _dev_nodes(dev_root, r"nvidia[0-9]+"),
        "nvswitch_count": len(nvswitches),
        "nvswitch_device_nodes": _dev_nodes(dev_root, r"nvidia-nvswitch[0-9]+"),
        "nvidia_driver_loaded": _driver_version(sys_root),
        "rdma_devices": rdma,
        "rdma_link_layers": sorted({p["link_layer"] for d in rdma for p in d["ports"]}),
        # one row a port, so checks can select on state and link layer without nested loops
        "rdma_ports": [
            {
                "device": d["name"],
                **p,
                "label": f"{d['name']} port {p['port']} ({p['state']}, {p['link_layer']})",
            }
            for d in rdma
            for p in d["ports"]
        ],
    }
    facts["report"] = report_lines(facts)
    return facts


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(
        argument_spec={
            "sys_root": {"type": "path", "default": "/sys"},
            "dev_root": {"type": "path", "default": "/dev"},
        },
        supports_check_mode=True,
    )
    facts = scan(Path(module.params["sys_root"]), Path(module.params["dev_root"]))
    module.exit_json(changed=False, ansible_facts={"servegrid_hardware": facts})


if __name__ == "__main__":
    main()
