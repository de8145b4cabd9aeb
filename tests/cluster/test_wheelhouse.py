"""Python packages reach offline test nodes as a wheelhouse, as on an air-gapped GPU cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_helpers import run_ansible
from tests.testbed import Testbed, TestbedConfig

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def test_servegrid_installs_with_its_dependencies_from_the_wheelhouse_on_an_offline_node(
    wheelhouse: Path,
):
    assert list(wheelhouse.glob("servegrid-*.whl")), list(wheelhouse.iterdir())
    cfg = TestbedConfig.from_env(
        prefix="sgtw",
        subnet="10.213.2.0/24",
        state_dir="/run/servegrid-testbed-wheelhouse",
        wheelhouse=wheelhouse,
    )
    bed = Testbed(cfg)
    try:
        up = bed.up(1)
        # No --no-deps: every dependency must come from the wheelhouse, the node has no index.
        script = (
            "set -e; python3 -m venv /opt/servegrid-venv; "
            "/opt/servegrid-venv/bin/pip install -q --no-index --find-links /opt/wheelhouse "
            "servegrid; cd /tmp; "
            "/opt/servegrid-venv/bin/servegrid serve -f /root/agg.yaml --dry-run"
        )
        config = (Path(__file__).resolve().parents[2] / "configs/agg.yaml").read_text()
        copied = run_ansible(
            up.inventory,
            "all",
            "-m",
            "ansible.builtin.copy",
            "-a",
            json.dumps({"content": config, "dest": "/root/agg.yaml"}),
        )
        assert copied.returncode == 0, copied.stdout + copied.stderr
        result = run_ansible(up.inventory, "all", "-m", "ansible.builtin.shell", "-a", script)
        assert result.returncode == 0, result.stdout + result.stderr
        # the dry run resolved the graph: the merged config of its services came back
        assert "Service Configuration:" in result.stdout
        assert "SERVEGRID_SERVICE_CONFIG=" in result.stdout
        assert '"Worker"' in result.stdout
        # the wheelhouse is read-only on the node: nothing there can be changed from it
        touch = run_ansible(
            up.inventory, "all", "-m", "ansible.builtin.command", "-a", "touch /opt/wheelhouse/x"
        )
        assert touch.returncode != 0
    finally:
        bed.down()
