"""The hardware detection module of the provisioning roles, on made-up sysfs and /dev trees.

roles/hardware_facts/library/servegrid_hardware_facts.py decides what every GPU role does on a
host (configure, skip or fail), so its reading of PCI classes, device nodes and RDMA ports is
checked here against the layouts of an 8-GPU HGX node, a RoCE node and a CPU node.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

MODULE = (
    Path(__file__).resolve().parents[2] / "roles/hardware_facts/library/servegrid_hardware_facts.py"
)


@pytest.fixture(scope="module")
def hardware():
    spec = importlib.util.spec_from_file_location("servegrid_hardware_facts", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pci(sys_root: Path, address: str, vendor: str, pci_class: str, device: str = "0x0000"):
    dev = sys_root / "bus/pci/devices" / address
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "class").write_text(pci_class + "\n")
    (dev / "device").write_text(device + "\n")


def rdma_port(sys_root: Path, device: str, port: int, state: str, link_layer: str, netdev: str):
    port_dir = sys_root / "class/infiniband" / device / "ports" / str(port)
    port_dir.mkdir(parents=True)
    (port_dir / "state").write_text(state + "\n")
    (port_dir / "link_layer").write_text(link_layer + "\n")
    (port_dir / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (sys_root / "class/infiniband" / device / "device/net" / netdev).mkdir(parents=True)


def test_an_hgx_node_shows_gpus_nvswitches_driver_and_ib_ports(hardware, tmp_path: Path):
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    for i in range(8):
        pci(sys_root, f"0000:{0x18 + i:02x}:00.0", "0x10de", "0x030200", "0x2330")
        (dev_root / f"nvidia{i}").touch()
    for i in range(4):
        pci(sys_root, f"0000:{0x80 + i:02x}:00.0", "0x10de", "0x068000", "0x22a3")
        (dev_root / f"nvidia-nvswitch{i}").touch()
    (dev_root / "nvidiactl").touch()  # not a GPU
    (dev_root / "nvidia-uvm").touch()
    pci(sys_root, "0000:00:02.0", "0x8086", "0x030000")  # a BMC/Intel VGA is no NVIDIA GPU
    (sys_root / "module/nvidia").mkdir(parents=True)
    (sys_root / "module/nvidia/version").write_text("580.95.05\n")
    rdma_port(sys_root, "mlx5_0", 1, "4: ACTIVE", "InfiniBand", "ibp24s0")
    rdma_port(sys_root, "mlx5_1", 1, "1: DOWN", "InfiniBand", "ibp25s0")

    facts = hardware.scan(sys_root, dev_root)

    assert facts["gpu_count"] == 8
    assert facts["gpus"][0] == {"address": "0000:18:00.0", "device": "0x2330"}
    assert facts["gpu_device_nodes"] == [str(dev_root / f"nvidia{i}") for i in range(8)]
    assert facts["nvswitch_count"] == 4
    assert len(facts["nvswitch_device_nodes"]) == 4
    assert facts["nvidia_driver_loaded"] == "580.95.05"
    assert [d["name"] for d in facts["rdma_devices"]] == ["mlx5_0", "mlx5_1"]
    assert facts["rdma_link_layers"] == ["InfiniBand"]
    assert facts["rdma_ports"][1] == {
        "device": "mlx5_1",
        "port": 1,
        "state": "DOWN",
        "link_layer": "InfiniBand",
        "rate": "400 Gb/sec (4X NDR)",
        "label": "mlx5_1 port 1 (DOWN, InfiniBand)",
    }
    report = "\n".join(facts["report"])
    assert "8 on PCI (vendor 10de), 8 /dev/nvidiaN" in report
    assert "4 on PCI, 4 /dev/nvidia-nvswitchN" in report
    assert "mlx5_0/1       ACTIVE, InfiniBand, 400 Gb/sec (4X NDR) (ibp24s0)" in report


def test_gpus_without_a_loaded_driver_have_no_device_nodes(hardware, tmp_path: Path):
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    pci(sys_root, "0000:18:00.0", "0x10de", "0x030200")
    rdma_port(sys_root, "mlx5_0", 1, "4: ACTIVE", "Ethernet", "eth2")

    facts = hardware.scan(sys_root, dev_root)

    assert facts["gpu_count"] == 1
    assert facts["gpu_device_nodes"] == []
    assert facts["nvidia_driver_loaded"] is None
    assert facts["rdma_link_layers"] == ["Ethernet"]
    assert "driver         not loaded" in facts["report"]


def test_a_cpu_node_has_nothing_and_says_so(hardware, tmp_path: Path):
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    pci(sys_root, "0000:00:01.0", "0x1af4", "0x020000")  # virtio NIC

    facts = hardware.scan(sys_root, dev_root)

    assert facts["gpu_count"] == 0
    assert facts["nvswitch_count"] == 0
    assert facts["rdma_devices"] == [] and facts["rdma_ports"] == []
    assert facts["report"] == [
        "GPUs           0 on PCI (vendor 10de), no /dev/nvidiaN",
        "driver         not loaded",
        "NVSwitch       0 on PCI, no /dev/nvidia-nvswitchN",
        "RDMA devices   none",
        "link layers    -",
    ]


def test_missing_sysfs_trees_read_as_no_hardware(hardware, tmp_path: Path):
    facts = hardware.scan(tmp_path / "nosys", tmp_path / "nodev")
    assert facts["gpu_count"] == 0 and facts["rdma_devices"] == []
