"""Python packages reach offline test nodes as a wheelhouse, as on an air-gapped GPU cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import require_testbed, run_ansible
from tests.testbed import Testbed, TestbedConfig

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def test_servegrid_installs_from_the_wheelhouse_on_an_offline_node(tmp_path: Path):
    require_testbed()
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheelhouse), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
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
        script = (
            "set -e; python3 -m venv /opt/servegrid-venv; "
            "/opt/servegrid-venv/bin/pip install -q --no-index --find-links /opt/wheelhouse "
            "--no-deps servegrid; "
            "/opt/servegrid-venv/bin/python -c 'import servegrid; print(servegrid.__version__)'"
        )
        result = run_ansible(up.inventory, "all", "-m", "ansible.builtin.shell", "-a", script)
        assert result.returncode == 0, result.stdout + result.stderr
        from servegrid import __version__

        assert __version__ in result.stdout
        # the wheelhouse is read-only on the node: nothing there can be changed from it
        touch = run_ansible(
            up.inventory, "all", "-m", "ansible.builtin.command", "-a", "touch /opt/wheelhouse/x"
        )
        assert touch.returncode != 0
    finally:
        bed.down()
