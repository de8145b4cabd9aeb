"""The molecule `default` scenario runs end to end against test nodes (create → destroy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import REPO, require_testbed

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def test_molecule_default_scenario_converges_on_test_nodes():
    require_testbed()
    bindir = Path(sys.executable).parent
    if not (bindir / "molecule").exists():
        pytest.skip(f"molecule not installed in {bindir}")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    result = subprocess.run(
        [str(bindir / "molecule"), "test", "--scenario-name", "default"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "idempotence" in result.stdout + result.stderr
