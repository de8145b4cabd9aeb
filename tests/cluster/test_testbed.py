"""The test-node harness itself: nodes boot, answer Ansible, fail and recover, leave no trace.

These tests use a testbed of their own (prefix, subnet, state dir) so they never disturb the
session fixture's nodes or a developer's; they share the cached base image.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import require_testbed, run_ansible
from tests.testbed import Testbed, TestbedConfig
from tests.testbed import base as base_image

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


@pytest.fixture
def cfg() -> TestbedConfig:
    require_testbed()
    return TestbedConfig.from_env(
        prefix="sgtt",
        subnet="10.213.1.0/24",
        state_dir="/run/servegrid-testbed-pytest",
    )


def host_traces(cfg: TestbedConfig) -> list[str]:
    """What the host shows of the testbed, read with plain tools rather than its own code."""
    traces = []
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, stat, args = line.split(None, 2)
        if "systemd-nspawn" in args and str(cfg.state_dir) in args and "Z" not in stat:
            traces.append(f"process {pid}: {args}")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if str(cfg.state_dir) in line.split()[1]:
            traces.append(f"mount {line}")
    netns = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    for ns in json.loads(netns or "[]"):
        if ns["name"].startswith(f"{cfg.prefix}-"):
            traces.append(f"netns {ns['name']}")
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    for link in json.loads(links):
        if link["ifname"].startswith((f"{cfg.prefix}-", cfg.bridge)):
            traces.append(f"link {link['ifname']}")
    return traces


def ping(inventory: Path, pattern: str) -> subprocess.CompletedProcess[str]:
    return run_ansible(inventory, pattern, "-m", "ansible.builtin.ping")


def wait_port(node, open_: bool, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.port_open(timeout=0.5) == open_:
            return True
        time.sleep(0.1)
    return False


def test_three_nodes_run_ansible_talk_crash_recover_and_leave_nothing(cfg):
    bed = Testbed(cfg)
    try:
        up = bed.up(3)
        node1, node2, node3 = up.nodes

        result = ping(up.inventory, "all")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count('"pong"') == 3

        result = run_ansible(
            up.inventory,
            "all",
            "-m",
            "ansible.builtin.systemd_service",
            "-a",
            "name=ssh.service state=started",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count('"state": "started"') == 3

        # TCP from node 1 to node 2 across the bridge: read sshd's banner.
        probe = (
            'python3 -c "import socket; '
            f"s=socket.create_connection(('{node2.ip}', 22), 5); "
            'print(s.recv(64).decode())"'
        )
        result = node1.ssh(probe)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("SSH-2.0-")

        bed.stop("node2")
        assert node2.pid() is None
        assert node2.container_pids() == []
        assert not node2.port_open(timeout=2)
        result = ping(up.inventory, "node2")
        assert result.returncode != 0
        assert "UNREACHABLE" in result.stdout
        assert node1.ssh(probe).returncode != 0  # node 1 sees it gone too

        bed.start("node2")
        result = ping(up.inventory, "node2")
        assert result.returncode == 0, result.stdout + result.stderr

        bed.cut("node3")
        assert [s.state for s in bed.status() if s.name == "node3"] == ["cut"]
        assert wait_port(node3, open_=False)
        bed.restore("node3")
        assert wait_port(node3, open_=True)
    finally:
        bed.down()
    assert host_traces(cfg) == []
    assert bed.leftovers() == []


def test_second_up_after_down_reuses_the_cached_base(cfg):
    bed = Testbed(cfg)
    try:
        bed.up(1)  # builds the base if this is the first use of the cache
    finally:
        bed.down()
    base = base_image.base_path(cfg)
    inode, builds = base.stat().st_ino, base_image.build_count(cfg)

    try:
        again = bed.up(1)
        assert again.base_built is False
        assert again.base == base
        assert base_image.build_count(cfg) == builds  # no second debootstrap
        assert base.stat().st_ino == inode
        assert ping(again.inventory, "all").returncode == 0
    finally:
        bed.down()
    assert host_traces(cfg) == []


def test_up_is_idempotent(cfg):
    bed = Testbed(cfg)
    try:
        first = bed.up(2)
        pids = [n.pid() for n in first.nodes]
        second = bed.up(2)
        assert [n.pid() for n in second.nodes] == pids  # running nodes left alone
        assert second.base_built is False
    finally:
        bed.down()
    bed.down()  # a second down finds nothing and succeeds
    assert host_traces(cfg) == []


def test_down_cleans_up_after_a_half_made_testbed(cfg):
    """A failed `up` can leave a netns, a link and a mount without a running node."""
    from tests.testbed import network
    from tests.testbed.node import Node

    bed = Testbed(cfg)
    base, _ = base_image.ensure_base(cfg, lambda _m: None)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        network.ensure_bridge(cfg)
        node = Node(cfg, 1)
        node.mount_root(base)
        network.ensure_node_link(cfg, node.name, node.ip)
        assert host_traces(cfg)  # something to clean
    finally:
        bed.down()
    assert host_traces(cfg) == []


def test_session_fixture_nodes_answer_ansible(testbed_nodes):
    result = testbed_nodes.ansible("all", "-m", "ansible.builtin.ping")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('"pong"') == len(testbed_nodes.up.nodes)
