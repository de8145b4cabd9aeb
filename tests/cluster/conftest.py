"""Fixtures for cluster tests: real systemd-nspawn test nodes (tests/testbed), reached over SSH.

`wheelhouse` (session scope) builds servegrid and all its dependencies as wheels once, with
scripts/build-wheelhouse.sh, for the tests that install onto offline nodes.
`testbed_nodes` (session scope) brings up SERVEGRID_TESTBED_NODES nodes (default 3) once for the
whole session and tears them down at its end, failed or not. Without root or the testbed's
Debian packages the tests skip with the reason, or fail when SERVEGRID_REQUIRE_TESTBED=1 (CI).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_helpers import REPO, require_testbed, run_ansible  # puts the repo root on sys.path
from tests.testbed import Testbed, TestbedConfig, UpResult


@dataclass(frozen=True)
class Cluster:
    testbed: Testbed
    up: UpResult

    @property
    def inventory(self) -> Path:
        return self.up.inventory

    def ansible(self, pattern: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_ansible(self.inventory, pattern, *args)


@pytest.fixture(scope="session")
def testbed_nodes() -> Iterator[Cluster]:
    require_testbed()
    bed = Testbed(TestbedConfig.from_env())
    count = int(os.environ.get("SERVEGRID_TESTBED_NODES", "3"))
    try:
        yield Cluster(bed, bed.up(count))
    finally:
        bed.down()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """servegrid and every dependency as wheels: what an air-gapped node installs from."""
    require_testbed()
    directory = tmp_path_factory.mktemp("wheelhouse")
    built = subprocess.run(
        ["bash", str(REPO / "scripts/build-wheelhouse.sh"), str(directory)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return directory
