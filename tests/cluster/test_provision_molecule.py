"""Molecule scenarios of the GPU-provisioning roles on test nodes (no GPU, no RDMA device).

Each scenario converges its role on the no-hardware path, checks idempotence, compares the
files the role renders (driver pin, drop-ins, RoCE settings, MPI hostfile) with expected/ and
asserts the failure message of `<role>_required: true` (molecule/<role>/verify.yml).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import REPO, require_testbed

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


@pytest.mark.parametrize("scenario", ["nvidia_driver", "rdma", "nccl_tests"])
def test_role_scenario_passes_on_a_node_without_gpu_or_rdma(scenario: str):
    require_testbed()
    bindir = Path(sys.executable).parent
    if not (bindir / "molecule").exists():
        pytest.fail(f"molecule not installed in {bindir} (install the dev extra)", pytrace=False)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    result = subprocess.run(
        [str(bindir / "molecule"), "test", "--scenario-name", scenario],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for step in ("converge", "idempotence", "verify"):
        assert f"{step}: Executed: Successful" in output, f"{step} did not run:\n{output[-3000:]}"
