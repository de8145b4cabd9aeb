"""How ray_cluster reads Ray clusters from an inventory: one head per ray_cluster_name.

Runs the role's topology step (inventory and set_fact only, no connection to a host) with
ansible-playbook over inventories/r1-disagg/ and over an inventory with every mistake the role
must name: a Ray cluster with two heads, one without a head, a host in both groups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "tests/unit/playbooks/ray_topology.yml"


def run_topology(inventory: Path, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "False",
    }
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(inventory),
            str(PLAYBOOK),
            "-e",
            f"topology_out={out}",
            "-e",
            "ansible_connection=local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )


def results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def test_r1_disagg_inventory_has_two_ray_clusters_each_with_its_head(tmp_path: Path):
    run = run_topology(REPO / "inventories/r1-disagg", tmp_path / "out")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    hosts = results(tmp_path / "out")

    assert set(hosts) == {"r1-node1", "r1-node2", "r1-node3", "r1-node4"}
    decode = ["r1-node1", "r1-node2"]
    prefill = ["r1-node3", "r1-node4"]
    for name in decode:
        assert hosts[name]["head"] == "r1-node1"
        assert hosts[name]["members"] == decode
        assert hosts[name]["address"] == "192.0.2.11:6379"
    for name in prefill:
        assert hosts[name]["head"] == "r1-node3"
        assert hosts[name]["members"] == prefill
        assert hosts[name]["address"] == "192.0.2.13:6379"
    assert [h for h, r in sorted(hosts.items()) if r["is_head"]] == ["r1-node1", "r1-node3"]
    # VLLM_HOST_IP is each node's own address
    assert hosts["r1-node4"]["host_ip"] == "192.0.2.14"


def test_inventory_mistakes_fail_naming_the_ray_cluster_and_hosts(tmp_path: Path):
    inventory = {
        "all": {
            "hosts": {
                name: {"ansible_host": f"192.0.2.{i}"}
                for i, name in enumerate(["a1", "a2", "b1", "c1", "g1", "g2"], start=1)
            },
            "children": {
                "ray_head": {"hosts": {"a1": {}, "a2": {}, "c1": {}, "g1": {}}},
                "ray_worker": {"hosts": {"b1": {}, "c1": {}, "g2": {}}},
                "ray_a": {"hosts": {"a1": {}, "a2": {}}, "vars": {"ray_cluster_name": "a"}},
                "ray_b": {"hosts": {"b1": {}}, "vars": {"ray_cluster_name": "b"}},
                "ray_c": {"hosts": {"c1": {}}, "vars": {"ray_cluster_name": "c"}},
                "ray_g": {"hosts": {"g1": {}, "g2": {}}, "vars": {"ray_cluster_name": "g"}},
            },
        }
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))

    run = run_topology(path, tmp_path / "out")
    output = " ".join((run.stdout + run.stderr).split())

    assert run.returncode != 0
    assert "Ray cluster 'a' (hosts: a1, a2) has 2 heads (a1, a2)" in output
    assert "Ray cluster 'b' (hosts: b1) has no head" in output
    assert "host c1 is in both ray_head and ray_worker" in output
    # the correct Ray cluster in the same inventory is still worked out
    assert set(results(tmp_path / "out")) == {"g1", "g2"}
