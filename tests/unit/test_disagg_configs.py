"""The disaggregated and multinode configs resolve: `servegrid serve --dry-run`, `servegrid graph`,
and each node's `--service-name` selection, as the configs' own comments tell users to run them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from servegrid.cli.loader import load_graph
from tests.support.serving import REPO

# config → the --service-name selections its comments give to the nodes
NODE_ROLES = {
    "disagg.yaml": ["Frontend,Processor,Worker", "PrefillWorker"],
    "disagg_router.yaml": ["Frontend,Processor,Router,Worker", "PrefillWorker"],
    "multinode-405b.yaml": ["Frontend,Processor,Router,Worker", "PrefillWorker"],
    "multinode_agg_r1.yaml": [],
    "multinode_disagg_r1.yaml": ["Frontend,Processor,Worker", "PrefillWorker"],
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "servegrid.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("name", sorted(NODE_ROLES))
def test_config_passes_dry_run_and_graph(name: str):
    path = REPO / "configs" / name
    dry = run_cli("serve", "-f", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    config = json.loads(dry.stdout.split("Service Configuration:\n", 1)[1].split("\n\n")[0])
    graph = run_cli("graph", "-f", str(path))
    assert graph.returncode == 0, graph.stderr
    disaggregated = "PrefillWorker" in config
    assert ("PrefillWorker" in graph.stdout) == disaggregated
    if disaggregated:
        assert config["Worker"]["remote-prefill"] is True
        # consumers own the queue's ack-wait; every prefill worker reads the same Common key
        assert "prefill-ack-wait" in config["PrefillWorker"]


@pytest.mark.parametrize(("name", "roles"), [(n, r) for n, rs in NODE_ROLES.items() for r in rs])
def test_each_node_role_resolves(name: str, roles: str):
    loaded = load_graph(None, REPO / "configs" / name, [], REPO, service_names=roles.split(","))
    assert set(roles.split(",")) <= set(loaded.graph.names())
