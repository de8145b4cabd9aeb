"""Fixtures that start real etcd and nats-server processes and always stop them by PID."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from servegrid.distributed.embedded_nats import die_with_parent
from tests.integration.servers import EtcdServer, NatsServer, require_binary

PROCS = Path(__file__).parent / "procs"
ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def etcd_binary() -> Path:
    return require_binary("etcd", Path("/usr/bin/etcd"))


@pytest.fixture
def nats_binary() -> Path:
    return require_binary("nats-server", Path(sys.executable).parent / "nats-server")


@pytest.fixture
def etcd(etcd_binary: Path, tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(etcd_binary, tmp_path / "etcd")
    try:
        server.start()
        yield server
    finally:
        server.stop(signal.SIGKILL)


@pytest.fixture
def nats_server(nats_binary: Path, tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(nats_binary, tmp_path / "nats")
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Child:
    """A Python helper process from ``procs/``, with its first line of output."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid

    async def first_line(self, timeout: float = 15.0) -> str:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            await self.process.wait()
            raise AssertionError(f"helper exited with {self.process.returncode} before output")
        return line.decode().strip()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator:
    """``await spawn("register.py", *args)`` starts a helper; all are SIGKILLed at teardown."""
    children: list[Child] = []

    async def start(script: str, *args: str) -> Child:
        log = (tmp_path / f"{script}.{len(children)}.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROCS / script),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
        log.close()
        child = Child(process)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            child.signal(signal.SIGCONT)
            child.signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.process.wait(), 10)
