"""Tests of optional extras: skip with the reason where one is not installed, but never in CI.

CI (``SERVEGRID_REQUIRE_TESTBED=1``) installs every extra whose tests it runs, so there a
missing one is a failure, not a silent skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_modules(*names: str, extra: str) -> None:
    """Skip (or fail under SERVEGRID_REQUIRE_TESTBED=1) unless every module can be imported."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (pip install 'servegrid[{extra}]')"
    if os.environ.get("SERVEGRID_REQUIRE_TESTBED") == "1":
        pytest.fail(reason + " (SERVEGRID_REQUIRE_TESTBED=1 makes this an error)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
