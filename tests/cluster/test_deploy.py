"""The deploy playbooks on four test nodes: first answer, idempotence, day-2 changes, teardown.

One testbed of its own (prefix sgdp, 10.213.10.0/24) and one deployment for the whole module;
the tests run in order and each builds on the cluster the previous one left:

  deploy-disagg.yml from bare nodes -> curl answers -> re-run changed=0 -> --check --diff no
  change -> validate.yml -> scale out (node5 as decode; no other unit restarted) -> scale in
  (node3 removed under load; zero failed) -> rolling upgrade under load (zero failed) ->
  teardown.yml leaves nothing.

The load is bounded in count and time and goes to the two frontends the way a load balancer
would: a request whose connection is refused (a frontend restarting) goes to the other one;
any request that reached a frontend and did not complete with 200 is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cluster_helpers import REPO, require_testbed
from tests.testbed import Testbed, TestbedConfig
from tests.testbed import inventory as testbed_inventory
from tests.testbed.node import Node

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
GRAPH = REPO / "configs/disagg_router.yaml"
UPGRADE_VERSION_SUFFIX = ".post1"
# Where services run (the shipped inventories/testbed/placement.ini); node5 joins as decode.
PLACEMENT = {
    "etcd": ["node1"],
    "nats": ["node1"],
    "frontend": ["node1", "node2"],
    "router": ["node1", "node2"],
    "decode": ["node2", "node3"],
    "prefill": ["node3", "node4"],
}
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
SEED_PROMPT = (
    "In the heart of Eldoria, an ancient land of boundless magic and mysterious creatures, lies "
    "the long-forgotten city of Aeloria. Once a beacon of knowledge and power, Aeloria was buried "
    "beneath the shifting sands of time, lost to the world for centuries."
)


@dataclass
class Deployment:
    bed: Testbed
    nodes: dict[str, Node]
    inventory: Path
    wheelhouse: Path
    placement: dict[str, list[str]]
    timings: dict[str, float] = field(default_factory=dict)

    def write_inventory(self, hosts: list[str]) -> None:
        """hosts.ini with these nodes (as the testbed writes it) and the placement groups."""
        nodes = [self.nodes[name] for name in hosts]
        (self.inventory / "hosts.ini").write_text(testbed_inventory.render(self.bed.cfg, nodes))
        groups = []
        for group, members in self.placement.items():
            listed = [m for m in members if m in hosts]
            groups.append(f"[{group}]\n" + "".join(f"{m}\n" for m in listed))
        (self.inventory / "placement.ini").write_text("\n".join(groups))

    def playbook(self, name: str, *args: str, label: str | None = None) -> str:
        env = {
            **os.environ,
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "PATH": f"{PLAYBOOK.parent}:{os.environ.get('PATH', '')}",
        }
        command = [
            str(PLAYBOOK),
            "-i",
            str(self.inventory),
            f"playbooks/{name}",
            "-e",
            f"servegrid_install_wheelhouse={self.wheelhouse}",
            "-e",
            f"servegrid_graph_config={GRAPH}",
            *args,
        ]
        started = time.monotonic()
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        self.timings[label or name] = round(time.monotonic() - started, 1)
        print(f"[deploy] {label or name}: {self.timings[label or name]}s")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{output[-6000:]}"
        secret = (self.inventory / "credentials/cluster.secret").read_text().strip()
        assert secret not in output, "the cluster secret appeared in the playbook output"
        return output

    def ssh(self, node: str, command: str) -> str:
        result = self.nodes[node].ssh(command)
        assert result.returncode == 0, f"{node}: {command}: {result.stderr}"
        return result.stdout


def frontend_errors(deployment: Deployment) -> str:
    """What the frontend nodes' servegrid units logged as errors: the why of a failed request."""
    found = []
    for node in ["node1", "node2"]:
        log = deployment.nodes[node].ssh(
            "journalctl --no-pager -o cat -u 'servegrid-*' | "
            "grep -E -B3 -A25 'Traceback|ERROR|internal error' | tail -n 150"
        )
        found.append(f"--- {node} ---\n{log.stdout}")
    return "\n".join(found)


def recap(output: str) -> dict[str, dict[str, int]]:
    return {
        host: {"ok": int(ok), "changed": int(ch), "unreachable": int(un), "failed": int(fa)}
        for host, ok, ch, un, fa in RECAP.findall(output)
    }


def unit_invocations(deployment: Deployment, node: str) -> dict[str, str]:
    """systemd's InvocationID of each servegrid unit: it changes on every (re)start."""
    out = deployment.ssh(
        node,
        "for u in $(systemctl list-units --plain --no-legend 'servegrid-*' | awk '{print $1}'); "
        'do echo "$u $(systemctl show -p InvocationID --value $u)"; done',
    )
    return dict(line.split() for line in out.splitlines() if line.strip())


def registered(deployment: Deployment) -> list[dict]:
    out = deployment.ssh(
        "node1",
        f"ETCD_ENDPOINTS=http://{deployment.nodes['node1'].ip}:2379 "
        "/opt/servegrid/venv/bin/servegrid status --json",
    )
    return json.loads(out)


def chat(address: str, content: str = SEED_PROMPT, max_tokens: int = 8) -> dict:
    response = httpx.post(
        f"http://{address}:8000/v1/chat/completions",
        json={
            "model": "servegrid/tiny-chat",
            "messages": [{"role": "user", "content": content}],
            "stream": False,
            "max_tokens": max_tokens,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


class Load:
    """Bounded client load over the frontends while a playbook runs."""

    def __init__(
        self, frontends: list[str], *, max_requests: int = 100_000, max_seconds: float = 900
    ):
        self.frontends = frontends
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.ok = 0
        self.failed: list[str] = []
        self.redirected = 0  # connection refused by a restarting frontend, sent to the other
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(4)]
        self._count = 0
        self._lock = threading.Lock()

    def _next(self) -> int | None:
        with self._lock:
            if self._count >= self.max_requests:
                return None
            self._count += 1
            return self._count

    def _one(self, client: httpx.Client, number: int) -> None:
        body = {
            "model": "servegrid/tiny-chat",
            "messages": [{"role": "user", "content": f"request {number}: {SEED_PROMPT}"}],
            "stream": False,
            "max_tokens": 8,
        }
        for attempt in range(len(self.frontends) * 3):
            address = self.frontends[(number + attempt) % len(self.frontends)]
            try:
                response = client.post(f"http://{address}:8000/v1/chat/completions", json=body)
            except httpx.ConnectError:
                # Refused before anything was sent: a load balancer's health check would have
                # taken this frontend out; try the next one.
                with self._lock:
                    self.redirected += 1
                time.sleep(0.2)
                continue
            except httpx.HTTPError as error:
                self.failed.append(f"{address}: {type(error).__name__}: {error}")
                return
            if response.status_code == 200 and response.json()["choices"]:
                with self._lock:
                    self.ok += 1
            else:
                self.failed.append(f"{address}: {response.status_code} {response.text[:200]}")
            return
        self.failed.append(f"request {number}: every frontend refused the connection")

    def _run(self, index: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        # No keep-alive: a request never rides a connection the server is about to close.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=60, limits=limits) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                number = self._next()
                if number is None:
                    return
                self._one(client, number)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def build_upgrade_wheel(wheelhouse: Path, workdir: Path) -> str:
    """A servegrid wheel one post-release above this tree's version, beside the others."""
    source = workdir / "servegrid-upgrade"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.pyc", "__pycache__")
    )
    pyproject = source / "pyproject.toml"
    current = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M).group(1)
    upgraded = current + UPGRADE_VERSION_SUFFIX
    pyproject.write_text(pyproject.read_text().replace(f'"{current}"', f'"{upgraded}"', 1))
    init = source / "runtime/servegrid/__init__.py"
    init.write_text(init.read_text().replace(f'"{current}"', f'"{upgraded}"'))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheelhouse), source],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return upgraded


@pytest.fixture(scope="module")
def deployment(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_testbed()
    cfg = TestbedConfig.from_env(
        prefix="sgdp", subnet="10.213.10.0/24", state_dir="/run/servegrid-testbed-deploy"
    )
    bed = Testbed(cfg)
    workdir = tmp_path_factory.mktemp("deploy")
    own_wheelhouse = workdir / "wheelhouse"
    shutil.copytree(wheelhouse, own_wheelhouse)  # the upgrade adds a wheel to it
    inventory = workdir / "inventory"
    shutil.copytree(REPO / "inventories/testbed/group_vars", inventory / "group_vars")
    try:
        bed.down()  # nodes left by an earlier interrupted run would not be bare
        started = time.monotonic()
        up = bed.up(4)
        deployment = Deployment(
            bed, {n.name: n for n in up.nodes}, inventory, own_wheelhouse, dict(PLACEMENT)
        )
        deployment.timings["testbed up 4"] = round(time.monotonic() - started, 1)
        deployment.write_inventory(["node1", "node2", "node3", "node4"])
        yield deployment
        print(f"[deploy] timings: {json.dumps(deployment.timings)}")
    finally:
        bed.down()
    assert bed.leftovers() == []


def test_deploy_disagg_from_bare_nodes_answers_the_seed_curl(deployment: Deployment):
    output = deployment.playbook("deploy-disagg.yml", label="first deploy")
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap(output).values())
    secret = deployment.inventory / "credentials/cluster.secret"
    assert secret.stat().st_mode & 0o777 == 0o600

    frontend = deployment.nodes["node1"].ip
    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "60",
            f"{frontend}:8000/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(
                {
                    "model": "servegrid/tiny-chat",
                    "messages": [{"role": "user", "content": SEED_PROMPT}],
                    "stream": False,
                    "max_tokens": 30,
                }
            ),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert curl.returncode == 0, curl.stderr
    answer = json.loads(curl.stdout)
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] == 30

    components = {(e["host"], e["component"]) for e in registered(deployment)}
    ip = {name: node.ip for name, node in deployment.nodes.items()}
    assert (ip["node2"], "Worker") in components and (ip["node3"], "Worker") in components
    assert (ip["node3"], "PrefillWorker") in components
    assert (ip["node4"], "PrefillWorker") in components
    assert (ip["node1"], "Router") in components and (ip["node2"], "Frontend") in components
    # each unit names its namespace and the secret file; the secret is the service user's only
    unit = deployment.ssh("node2", "cat /etc/systemd/system/servegrid-decode.service")
    assert "SERVEGRID_NAMESPACE=servegrid" in unit
    assert "SERVEGRID_CLUSTER_SECRET_FILE=/etc/servegrid/cluster.secret" in unit
    assert "TimeoutStopSec=25" in unit  # drain 10 s on test nodes + 15
    mode = deployment.ssh("node2", "stat -c '%U %a' /etc/servegrid/cluster.secret").split()
    assert mode == ["servegrid", "600"]


def test_second_run_changes_nothing(deployment: Deployment):
    output = deployment.playbook("deploy-disagg.yml", label="idempotent re-run")
    result = recap(output)
    assert set(result) >= {"node1", "node2", "node3", "node4"}
    assert {h: r["changed"] for h, r in result.items()} == dict.fromkeys(result, 0)
    # An ordinary run warns about nothing (the scale-in play's empty host group used to).
    assert "[WARNING]" not in output, output[output.index("[WARNING]") :][:500]


def test_check_diff_on_the_deployed_cluster_reports_no_change(deployment: Deployment):
    output = deployment.playbook("deploy-disagg.yml", "--check", "--diff", label="check diff")
    result = recap(output)
    assert {h: r["changed"] for h, r in result.items()} == dict.fromkeys(result, 0)
    assert "--- before" not in output


def test_validate_passes(deployment: Deployment):
    output = deployment.playbook("validate.yml", label="validate")
    assert output.count("chat completion | ok") == 2  # both frontends answered
    assert "etcd health   | true" in output
    assert "nats health         | ok" in output


def test_scale_out_adds_a_decode_node_without_restarting_others(deployment: Deployment):
    before = {n: unit_invocations(deployment, n) for n in ["node1", "node2", "node3", "node4"]}
    started = time.monotonic()
    up = deployment.bed.up(5)
    deployment.timings["testbed up 5"] = round(time.monotonic() - started, 1)
    deployment.nodes["node5"] = next(n for n in up.nodes if n.name == "node5")
    deployment.placement["decode"].append("node5")
    deployment.write_inventory(["node1", "node2", "node3", "node4", "node5"])

    output = deployment.playbook("deploy-disagg.yml", label="scale out (node5 decode)")
    result = recap(output)
    assert result["node5"]["changed"] > 0
    assert {h: r["changed"] for h, r in result.items() if h != "node5"} == dict.fromkeys(
        [h for h in result if h != "node5"], 0
    )
    after = {n: unit_invocations(deployment, n) for n in before}
    assert after == before  # no unit elsewhere restarted

    # node5's workers take traffic: with the other decode units stopped it serves alone.
    assert unit_invocations(deployment, "node5").keys() == {"servegrid-decode.service"}
    for node in ["node2", "node3"]:
        deployment.ssh(node, "systemctl stop servegrid-decode.service")
    try:
        assert chat(deployment.nodes["node1"].ip)["choices"][0]["message"]["content"]
    finally:
        for node in ["node2", "node3"]:
            deployment.ssh(node, "systemctl start servegrid-decode.service")


def test_scale_in_drains_the_removed_node_with_no_failed_request(deployment: Deployment):
    node3 = deployment.nodes["node3"].ip
    for group in deployment.placement.values():
        if "node3" in group:
            group.remove("node3")
    deployment.write_inventory(["node1", "node2", "node4", "node5"])
    frontends = [deployment.nodes["node1"].ip, deployment.nodes["node2"].ip]
    with Load(frontends) as load:
        output = deployment.playbook("deploy-disagg.yml", label="scale in (node3 removed)")
    print(
        f"[deploy] scale-in load: ok={load.ok} failed={len(load.failed)} "
        f"redirected={load.redirected}"
    )
    assert load.failed == []
    assert load.ok > 0
    assert f"draining and stopping servegrid on {node3}" in output
    assert all(e["host"] != node3 for e in registered(deployment))
    units = deployment.nodes["node3"].ssh("ls /etc/systemd/system | grep -c '^servegrid-' || true")
    assert units.stdout.strip() == "0"


def test_rolling_upgrade_under_load_fails_no_request(deployment: Deployment, tmp_path: Path):
    version = build_upgrade_wheel(deployment.wheelhouse, tmp_path)
    frontends = [deployment.nodes["node1"].ip, deployment.nodes["node2"].ip]
    with Load(frontends) as load:
        deployment.playbook(
            "deploy-disagg.yml",
            "-e",
            "servegrid_serial=1",
            "-e",
            f"servegrid_install_version={version}",
            label="rolling upgrade (serial 1)",
        )
    print(
        f"[deploy] upgrade load: ok={load.ok} failed={len(load.failed)} "
        f"redirected={load.redirected}"
    )
    assert load.failed == [], frontend_errors(deployment)
    assert load.ok > 0
    assert load.redirected > 0  # the load ran while the frontends restarted
    for node in ["node1", "node2", "node4", "node5"]:
        probe = "import servegrid; print(servegrid.__version__)"
        installed = deployment.ssh(node, f"/opt/servegrid/venv/bin/python -c '{probe}'")
        assert installed.strip() == version


def test_teardown_leaves_nothing(deployment: Deployment):
    deployment.playbook("teardown.yml", label="teardown")
    for node in ["node1", "node2", "node4", "node5"]:
        left = deployment.ssh(
            node,
            "ls -d /opt/servegrid /etc/servegrid /var/lib/servegrid /var/lib/etcd/servegrid "
            "/var/lib/nats-server/jetstream /etc/systemd/system/servegrid-* 2>/dev/null; "
            "systemctl is-active etcd nats-server 'servegrid-*' 2>/dev/null | grep -x active; "
            "getent passwd servegrid; pgrep -f '[s]ervegrid serve'; true",
        )
        assert left.strip() == "", f"{node} still has: {left}"
