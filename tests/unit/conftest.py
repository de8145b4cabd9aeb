"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from servegrid.distributed.discovery.file import FileDiscovery
from servegrid.distributed.runtime import DistributedRuntime


@pytest.fixture
async def runtimes(request, tmp_path):
    """A factory of runtimes on one file-discovery directory, shut down after the test.

    A test module sets ``RUNTIME_DRAIN_TIMEOUT`` to choose how long teardown lets in-flight
    streams finish (default 1 s).
    """
    drain_timeout = getattr(request.module, "RUNTIME_DRAIN_TIMEOUT", 1.0)
    made: list[DistributedRuntime] = []

    async def make() -> DistributedRuntime:
        rt = DistributedRuntime(FileDiscovery(tmp_path))
        await rt.discovery.start()
        made.append(rt)
        return rt

    yield make
    for rt in made:
        await rt.shutdown(drain_timeout=drain_timeout)
