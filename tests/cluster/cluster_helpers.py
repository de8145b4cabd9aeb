"""Helpers shared by cluster tests: the testbed gate and ad-hoc Ansible runs.

A module of its own (not conftest) so test files can import it by name; conftest.py puts the
repository root on sys.path so `tests.testbed` imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.testbed import preflight_problems  # noqa: E402

# ansible-core from the same environment as pytest (the project venv).
ANSIBLE = Path(sys.executable).parent / "ansible"


def require_testbed() -> None:
    """Skip (or fail, when SERVEGRID_REQUIRE_TESTBED=1) unless test nodes can run here."""
    problems = preflight_problems()
    if not ANSIBLE.exists():
        problems.append(f"ansible not found at {ANSIBLE} (install the dev extra)")
    if not problems:
        return
    unavailable("test nodes unavailable: " + "; ".join(problems))


def unavailable(reason: str) -> None:
    """Skip for a missing tool, or fail when SERVEGRID_REQUIRE_TESTBED=1 (CI) says it must exist."""
    if os.environ.get("SERVEGRID_REQUIRE_TESTBED") == "1":
        pytest.fail(reason + " (SERVEGRID_REQUIRE_TESTBED=1 makes this an error)", pytrace=False)
    pytest.skip(reason)


# Settings every test's ansible run shares. The repository's ansible.cfg prints results as
# YAML for people; tests read them as JSON, where messages keep their quotes as written.
ANSIBLE_TEST_ENV = {
    "ANSIBLE_HOST_KEY_CHECKING": "False",
    "ANSIBLE_NOCOLOR": "1",
    "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
}


def run_ansible(
    inventory: Path, pattern: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run an ad-hoc ansible command against test nodes; output kept for assertions."""
    env = {**os.environ, **ANSIBLE_TEST_ENV}
    return subprocess.run(
        [str(ANSIBLE), "-i", str(inventory), pattern, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
