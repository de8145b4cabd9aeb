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
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.testbed import Testbed, TestbedConfig  # noqa: E402
from tests.testbed import inventory as testbed_inventory  # noqa: E402

PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
WHEELHOUSE_VAR = "servegrid_install_wheelhouse"
FRONTEND_PORT = 8000  # configs/disagg_router.yaml
CHAT = {
    "model": "servegrid/tiny-chat",
    "messages": [{"role": "user", "content": "Hello"}],
    "max_tokens": 8,
}


def first_answer(address: str, deadline_s: float = 120) -> float:
    """Seconds until the frontend at address answers a chat completion (bounded by deadline_s)."""
    started = time.monotonic()
    request = urllib.request.Request(
        f"http://{address}:{FRONTEND_PORT}/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Content-Type": "application/json"},
    )
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if json.load(response)["choices"][0]["message"]["content"]:
                    return round(time.monotonic() - started, 1)
        except (urllib.error.URLError, OSError, KeyError, ValueError) as error:
            if time.monotonic() - started > deadline_s:
                raise SystemExit(f"no answer from {address}:{FRONTEND_PORT}: {error}") from error
        time.sleep(0.5)


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


def slowest_tasks(junit_dir: Path, count: int = 6) -> list[str]:
    """The tasks that took longest (the slowest host's time), from Ansible's junit callback.

    A task's time on a host runs from the task's start to that host's result, so the slowest
    host's time is the task's share of the play's wall time (the linear strategy waits for all).
    """
    slowest: dict[str, tuple[float, int]] = {}
    for report in junit_dir.glob("*.xml"):
        for case in ET.parse(report).getroot().iter("testcase"):
            host, _, task = case.get("name", "").partition("] ")
            seconds = float(case.get("time") or 0)
            worst, hosts = slowest.get(task, (0.0, 0))
            slowest[task] = (max(worst, seconds), hosts + 1 if host else hosts)
    ranked = sorted(slowest.items(), key=lambda item: item[1][0], reverse=True)[:count]
    return [f"{seconds:6.1f}s  {hosts} host(s)  {task}" for task, (seconds, hosts) in ranked]


def run_playbook(inventory: Path, wheelhouse: Path, name: str, junit_dir: Path) -> float:
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
        env={
            **os.environ,
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.junit",
            "JUNIT_OUTPUT_DIR": str(junit_dir),
            "JUNIT_HIDE_TASK_ARGUMENTS": "true",  # keep secrets out of the report
            "JUNIT_INCLUDE_SETUP_TASKS_IN_REPORT": "true",
        },
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
    # Killed or interrupted, still tear the test nodes down (the finally below): a background
    # job inherits SIGINT ignored, and SIGTERM would otherwise end Python without unwinding.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _frame: sys.exit(128 + signum))
    cfg = TestbedConfig.from_env(
        prefix="sgdb", subnet="10.213.11.0/24", state_dir="/run/servegrid-testbed-deploy-bench"
    )
    bed = Testbed(cfg)
    load_at_start = os.getloadavg()
    timings: dict[str, float] = {}
    slowest: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def timed(label: str, name: str) -> None:
            junit_dir = work / f"junit-{len(timings)}"
            timings[label] = run_playbook(inventory, wheelhouse, name, junit_dir)
            slowest[label] = slowest_tasks(junit_dir)

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
            timed("first deploy (deploy-disagg.yml on bare nodes)", "deploy-disagg.yml")
            frontend = next(n.ip for n in bed.nodes() if n.name == "node1")
            timings["bare nodes to first answer (deploy + first chat completion)"] = round(
                timings["first deploy (deploy-disagg.yml on bare nodes)"] + first_answer(frontend),
                1,
            )
            timed("idempotent re-run", "deploy-disagg.yml")
            bed.up(args.nodes + 1)
            groups["decode"].append(f"node{args.nodes + 1}")
            write_inventory(inventory, bed, args.nodes + 1, groups)
            timed("scale-out of one decode node", "deploy-disagg.yml")
        finally:
            bed.down()
    report = {
        "nodes": args.nodes,
        "seconds": timings,
        "load average (1, 5, 15 min) at start": load_at_start,
        "load average at end": os.getloadavg(),
        "slowest tasks": slowest,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
