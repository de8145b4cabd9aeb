"""Helpers for the GPU-provisioning cluster tests: inventories with Ray clusters, playbook runs.

Test nodes have no GPU and no RDMA device, so provision-gpu.yml exercises the roles' detection
(skip with one line) and really starts Ray, installed from a wheelhouse built on this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from cluster_helpers import ANSIBLE_TEST_ENV, REPO
from tests.testbed import UpResult

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
PROVISION_GPU = REPO / "playbooks" / "provision-gpu.yml"
# Where the testbed binds the controller's wheelhouse in every node (read-only).
NODE_WHEELHOUSE = "/opt/wheelhouse"
# Keep Ray small on test nodes: one CPU each and the smallest object store Ray accepts.
RAY_TEST_START_ARGS = ["--num-cpus=1", "--object-store-memory=78643200"]
RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.MULTILINE)


def build_ray_wheelhouse(dest: Path, python_version: str) -> None:
    """Ray and its dependencies for the nodes' Python, downloaded on the controller."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-ray-wheelhouse.sh"), str(dest), python_version],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def write_inventory(up: UpResult, ray_clusters: dict[str, list[str]], path: Path) -> Path:
    """An inventory of the test nodes: per Ray cluster, its first node is the head.

    Each Ray cluster is also a group of its own (`ray_<name>`) carrying `ray_cluster_name`,
    the layout inventories/r1-disagg/ uses.
    """
    by_name = {node.name: node for node in up.nodes}
    ssh = up.inventory.read_text()
    key = re.search(r"ansible_ssh_private_key_file=(\S+)", ssh).group(1)
    hosts = {n: {"ansible_host": by_name[n].ip} for names in ray_clusters.values() for n in names}
    children = {
        "ray_head": {"hosts": {names[0]: {} for names in ray_clusters.values()}},
        "ray_worker": {"hosts": {n: {} for names in ray_clusters.values() for n in names[1:]}},
    }
    for name, names in ray_clusters.items():
        children[f"ray_{name}"] = {
            "hosts": {n: {} for n in names},
            "vars": {"ray_cluster_name": name},
        }
    inventory = {
        "all": {
            "hosts": hosts,
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": key,
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ray_cluster_pip_find_links": NODE_WHEELHOUSE,
                "ray_cluster_start_args": RAY_TEST_START_ARGS,
            },
            "children": children,
        }
    }
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def run_playbook(
    inventory: Path, playbook: Path, *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **ANSIBLE_TEST_ENV,
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_FORKS": "16",
    }
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(playbook), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host: {'node1': {'ok': 12, 'changed': 0, ...}}."""
    tail = output[output.rfind("PLAY RECAP") :]
    return {
        host: {k: int(v) for k, v in (pair.split("=") for pair in counters.split())}
        for host, counters in RECAP.findall(tail)
    }
