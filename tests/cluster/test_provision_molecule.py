"""Molecule scenarios of the GPU-provisioning roles on a test node (no GPU, no RDMA device).

`gpu_roles` runs the per-role scenarios' playbooks (molecule/nvidia_driver, rdma, nccl_tests)
in one create/destroy: each role converges on the no-hardware path and is idempotent; verify
compares the files the roles render (driver pin, drop-ins, RoCE settings, MPI hostfile) with
their expected/ files, asserts the failure messages of `<role>_required: true`, the RDMA port
checks on a made-up sysfs and the NCCL bandwidth verdicts on sample outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import REPO, require_testbed

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def test_gpu_role_scenarios_pass_on_a_node_without_gpu_or_rdma():
    scenario = "gpu_roles"
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
