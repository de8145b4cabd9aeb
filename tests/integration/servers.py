"""Real etcd and nats-server processes for integration tests.

Each server runs on free loopback ports with its data in a directory the test owns, can be
stopped and started again on the same ports and data (an outage, then "the same" server), and
is ended by its PID. Servers die with the test process even if it is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from servegrid.distributed.embedded_nats import die_with_parent, free_port, stop_process

START_TIMEOUT = 20.0


def require_binary(name: str, *candidates: Path) -> Path:
    """The binary's path; without it the test fails under CI and is skipped elsewhere."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    message = (
        f"{name} not found (looked in {', '.join(map(str, candidates)) or '-'} and PATH); "
        "install it with scripts/setup.sh"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _start(args: list[str], log_path: Path) -> subprocess.Popen:
    log = log_path.open("ab")
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
    finally:
        log.close()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class EtcdServer:
    """A one-member etcd cluster on loopback."""

    def __init__(self, binary: Path, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.process = _start(
            [
                str(self.binary),
                "--name",
                "default",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"default={peer}",
            ],
            self.log_path,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = _log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"etcd did not become healthy at {self.url}:\n{tail}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as response:
                return json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if sig == signal.SIGKILL:
            proc.kill()
            proc.wait()
        else:
            stop_process(proc)


class NatsServer:
    """A nats-server with JetStream on a fixed loopback port and a persistent store.

    With ``password`` it requires user ``user`` with that password, configured as the deploy
    role configures it: an ``authorization`` block in a config file.
    """

    def __init__(
        self, binary: Path, store_dir: Path, *, user: str = "servegrid", password: str | None = None
    ) -> None:
        self.binary = binary
        self.store_dir = store_dir
        self.user = user
        self.password = password
        self.log_path = store_dir.parent / f"{store_dir.name}.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [str(self.binary), "-a", "127.0.0.1", "-p", str(self.port)]
        args += ["-js", "-sd", str(self.store_dir)]
        if self.password is not None:
            config = self.store_dir.parent / f"{self.store_dir.name}.conf"
            config.write_text(
                f"authorization {{\n  user: {json.dumps(self.user)}\n"
                f"  password: {json.dumps(self.password)}\n}}\n"
            )
            args += ["-c", str(config)]
        self.process = _start(args, self.log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = _log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"nats-server did not start at {self.url}:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc)


def _accepts(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` exits (any process, not only a child); False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)
