"""Molecule scenarios run end to end against test nodes: create, converge, idempotence, verify,
destroy. `default` proves the nodes behave like hosts; the others test one role each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import REPO, require_testbed, unavailable

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

SCENARIOS = ["default", "etcd", "nats", "servegrid_install", "servegrid_service"]


def molecule_binary() -> Path:
    """The venv's molecule; missing is a skip, or a failure where CI requires the testbed."""
    binary = Path(sys.executable).parent / "molecule"
    if not binary.exists():
        unavailable(f"molecule not installed in {binary.parent} (install the dev extra)")
    return binary


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario_converges_idempotently_and_verifies(scenario: str, wheelhouse: Path):
    require_testbed()
    binary = molecule_binary()
    env = {
        **os.environ,
        "PATH": f"{binary.parent}:{os.environ.get('PATH', '')}",
        "NO_COLOR": "1",
        "ANSIBLE_NOCOLOR": "1",
        "SERVEGRID_MOLECULE_WHEELHOUSE": str(wheelhouse),
    }
    result = subprocess.run(
        [str(binary), "test", "--scenario-name", scenario],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "idempotence" in output
    assert "verify" in output
