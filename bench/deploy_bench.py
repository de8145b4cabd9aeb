"""Time the deploy playbooks on N test nodes: bare nodes to first answer, idempotent re-run,
scale-out of one decode node. Figures go to docs/deploy.md.

    sudo .venv/bin/python bench/deploy_bench.py --nodes 4
    sudo .venv/bin/python bench/deploy_bench.py --nodes 8

Node 1 runs etcd, NATS, a frontend and a router; node 2 a frontend, a router and decode; the
rest alternate decode and prefill; node N+1 joins as decode. Uses a testbed of its own (prefix
sgdb, 10.213.11.0/24) and removes it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.testbed import Testbed, TestbedConfig  # noqa: E402
from tests.testbed import inventory as testbed_inventory  # noqa: E402

PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
WHEELHOUSE_VAR = "servegrid_install_wheelhouse"


def placement(count: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {
        "etcd": ["node1"],
        "nats": ["node1"],
        "frontend": ["node1", "node2"],
        "router": ["node1", "node2"],
        "decode": ["node2"],
        "prefill": [],
    }
    for index in range(3, count + 1):
        groups["decode" if index % 2 else "prefill"].append(f"node{index}")
    return groups


def write_inventory(directory: Path, bed: Testbed, count: int, groups: dict[str, list[str]]):
    nodes = [n for n in bed.nodes() if n.index <= count]
    (directory / "hosts.ini").write_text(testbed_inventory.render(bed.cfg, nodes))
    text = "".join(
        f"[{g}]\n" + "".join(f"{h}\n" for h in hosts) + "\n" for g, hosts in groups.items()
    )
    (directory / "placement.ini").write_text(text)


def run_playbook(inventory: Path, wheelhouse: Path, name: str) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [
            str(PLAYBOOK),
            "-i",
            str(inventory),
            f"playbooks/{name}",
            "-e",
            f"{WHEELHOUSE_VAR}={wheelhouse}",
        ],
        cwd=REPO,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return round(time.monotonic() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args()
    cfg = TestbedConfig.from_env(
        prefix="sgdb", subnet="10.213.11.0/24", state_dir="/run/servegrid-testbed-deploy-bench"
    )
    bed = Testbed(cfg)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wheelhouse = work / "wheelhouse"
        subprocess.run(
            ["bash", "scripts/build-wheelhouse.sh", str(wheelhouse)], cwd=REPO, check=True
        )
        inventory = work / "inventory"
        inventory.mkdir()
        subprocess.run(
            ["cp", "-r", str(REPO / "inventories/testbed/group_vars"), str(inventory)], check=True
        )
        groups = placement(args.nodes)
        try:
            started = time.monotonic()
            bed.up(args.nodes)
            timings["nodes up"] = round(time.monotonic() - started, 1)
            write_inventory(inventory, bed, args.nodes, groups)
            timings["first deploy (bare nodes to first answer)"] = run_playbook(
                inventory, wheelhouse, "deploy-disagg.yml"
            )
            timings["idempotent re-run"] = run_playbook(inventory, wheelhouse, "deploy-disagg.yml")
            bed.up(args.nodes + 1)
            groups["decode"].append(f"node{args.nodes + 1}")
            write_inventory(inventory, bed, args.nodes + 1, groups)
            timings["scale-out of one decode node"] = run_playbook(
                inventory, wheelhouse, "deploy-disagg.yml"
            )
        finally:
            bed.down()
    print(json.dumps({"nodes": args.nodes, "seconds": timings}, indent=2))


if __name__ == "__main__":
    main()
