"""playbooks/provision-gpu.yml on two CPU-only test nodes: a real Ray cluster, nothing else.

The nodes have no GPU and no RDMA device: the preflight table says so, nvidia_driver, rdma and
nccl_tests skip with one line each, and ray_cluster installs Ray from a wheelhouse built on this
machine (the nodes are offline) and starts a head on node1 that node2 joins. `--check` first
must run clean on the untouched nodes; a second real run must change nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_helpers import require_testbed, run_ansible
from provision_helpers import (
    PROVISION_GPU,
    build_ray_wheelhouse,
    recap,
    run_playbook,
    write_inventory,
)
from tests.testbed import Testbed, TestbedConfig, UpResult

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]


@dataclass(frozen=True)
class RayNodes:
    up: UpResult
    inventory: Path


@pytest.fixture(scope="module")
def ray_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNodes]:
    require_testbed()
    tmp = tmp_path_factory.mktemp("provision-gpu")
    wheelhouse = tmp / "wheelhouse"
    wheelhouse.mkdir()
    # The GPU-provisioning engineer's testbed (distinct prefix, subnet and state dir).
    cfg = TestbedConfig.from_env(
        prefix="sgpv",
        subnet="10.213.20.0/24",
        state_dir="/run/servegrid-testbed-prov",
        wheelhouse=wheelhouse,
    )
    bed = Testbed(cfg)
    try:
        up = bed.up(2)
        # Wheels for the nodes' Python, whatever runs the tests; the bind mount shows them live.
        probe = run_ansible(
            up.inventory,
            "node1",
            "-m",
            "ansible.builtin.command",
            "-a",
            "python3 -c 'import sys; print(\"py=%d.%d\" % sys.version_info[:2])'",
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        build_ray_wheelhouse(wheelhouse, re.search(r"py=(\d+\.\d+)", probe.stdout).group(1))
        inventory = write_inventory(up, {"test": ["node1", "node2"]}, tmp / "hosts.yml")
        yield RayNodes(up, inventory)
    finally:
        bed.down()


def ray_status(nodes: RayNodes) -> str:
    head = nodes.up.nodes[0]
    result = run_ansible(
        nodes.inventory,
        "node1",
        "-m",
        "ansible.builtin.command",
        "-a",
        f"/opt/servegrid/venv/bin/ray status --address {head.ip}:6379",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_check_run_then_ray_cluster_of_two_nodes_then_a_rerun_changes_nothing(ray_nodes):
    node1, node2 = ray_nodes.up.nodes

    checked = run_playbook(ray_nodes.inventory, PROVISION_GPU, "--check")
    assert checked.returncode == 0, checked.stdout[-5000:] + checked.stderr[-2000:]
    assert all(c["failed"] == 0 for c in recap(checked.stdout).values())
    # --check changed nothing: no Ray, no unit on the nodes
    units = run_ansible(
        ray_nodes.inventory, "all", "-m", "ansible.builtin.command", "-a", "ls /etc/systemd/system"
    )
    assert "ray-head.service" not in units.stdout and "ray-worker.service" not in units.stdout

    first = run_playbook(ray_nodes.inventory, PROVISION_GPU)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-2000:]
    out = first.stdout
    # the preflight table, then one skip line per role and host
    assert "hardware on node1" in out and "RDMA devices   none" in out
    for role, reason in [
        ("nvidia_driver", "no NVIDIA GPU found"),
        ("rdma", "no RDMA device found"),
        ("nccl_tests", "no NVIDIA GPU found"),
    ]:
        for node in ("node1", "node2"):
            assert f"{role}: skipped on {node}: {reason}" in out, role
    assert "ray_cluster: Ray cluster 'test': 2 nodes, 0 GPUs" in out

    status = ray_status(ray_nodes)
    assert len(re.findall(r"^\s*1 node_[0-9a-f]+$", status, re.MULTILINE)) == 2, status
    assert "(no pending nodes)" in status

    env = run_ansible(
        ray_nodes.inventory,
        "node2",
        "-m",
        "ansible.builtin.command",
        "-a",
        "cat /etc/servegrid/ray.env",
    )
    assert f"RAY_ADDRESS={node1.ip}:6379" in env.stdout
    assert f"VLLM_HOST_IP={node2.ip}" in env.stdout

    second = run_playbook(ray_nodes.inventory, PROVISION_GPU)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-2000:]
    counters = recap(second.stdout)
    assert set(counters) == {"node1", "node2"}
    assert {host: c["changed"] for host, c in counters.items()} == {"node1": 0, "node2": 0}, (
        second.stdout[-5000:]
    )
    # the same two nodes, not a restarted cluster with new node ids
    assert sorted(re.findall(r"node_[0-9a-f]+", ray_status(ray_nodes))) == sorted(
        re.findall(r"node_[0-9a-f]+", status)
    )
