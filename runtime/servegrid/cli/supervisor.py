"""Run a set of processes, restart the ones that crash, stop them all on request.

Each child runs in its own session (so a terminal's Ctrl-C reaches only the supervisor, which
then stops children in order) and gets SIGTERM from the kernel if the supervisor dies, so no
child outlives it. Output lines are prefixed with the child's label.

A stop sends SIGTERM to every child at once: each drains (finishes its in-flight requests)
and exits; one still running ``stop_timeout`` seconds later is killed. A second stop (a second
Ctrl-C) kills at once. A child that dies is restarted after a backoff (with jitter) that
doubles up to ``BACKOFF_MAX`` and resets once a run has lasted ``HEALTHY_AFTER`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from servegrid.distributed.embedded_nats import die_with_parent
from servegrid.distributed.retry import Backoff

#: a child exiting with this status reported a configuration error: restarting cannot help
EXIT_USER_ERROR = 2
BACKOFF_START = 0.5
BACKOFF_MAX = 15.0
HEALTHY_AFTER = 30.0  # a run this long resets the backoff
COLORS = ["36", "32", "35", "33", "34", "91", "92", "95", "96", "93"]


@dataclass
class ProcessSpec:
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stop_timeout: float | None = None  # seconds from SIGTERM to SIGKILL (None: the default)


@dataclass
class _Child:
    spec: ProcessSpec
    color: str
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, specs: list[ProcessSpec], *, grace: float = 15.0) -> None:
        self._children = [_Child(s, COLORS[i % len(COLORS)]) for i, s in enumerate(specs)]
        self._grace = grace
        self._stopping = asyncio.Event()
        self._kill_now = asyncio.Event()
        self.failed = False  # a child reported a configuration error
        self._use_color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def _emit(self, child: _Child, line: str) -> None:
        label = f"[{child.spec.label}]"
        if self._use_color:
            label = f"\x1b[{child.color}m{label}\x1b[0m"
        sys.stdout.write(f"{label} {line}\n")
        sys.stdout.flush()

    def note(self, message: str) -> None:
        sys.stdout.write(f"[servegrid] {message}\n")
        sys.stdout.flush()

    async def _pump(self, child: _Child, stream: asyncio.StreamReader) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            self._emit(child, line.decode(errors="replace").rstrip("\n"))

    async def _run_child(self, child: _Child) -> None:
        backoff = Backoff(start=BACKOFF_START, maximum=BACKOFF_MAX)
        env = {**os.environ, **child.spec.env}
        while not self._stopping.is_set():
            started = time.monotonic()
            child.proc = await asyncio.create_subprocess_exec(
                *child.spec.argv,
                env=env,
                cwd=child.spec.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
            assert child.proc.stdout is not None
            pump = asyncio.create_task(self._pump(child, child.proc.stdout))
            code = await child.proc.wait()
            await pump
            if self._stopping.is_set():
                return
            if code == EXIT_USER_ERROR:
                self.note(
                    f"{child.spec.label} stopped on a configuration error; stopping the graph"
                )
                self.failed = True
                self.stop()
                return
            if time.monotonic() - started > HEALTHY_AFTER:
                backoff.reset()
            reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            child.restarts += 1
            who = f"{child.spec.label} (pid {child.proc.pid})"
            delay = backoff.next_delay()
            self.note(f"{who} died with {reason}; restarting in {delay:.1f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def run(self) -> None:
        """Run until ``stop()``; then terminate every child and wait for it."""
        tasks = [asyncio.create_task(self._run_child(c)) for c in self._children]
        await self._stopping.wait()
        await self._terminate_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop gracefully; called again while stopping, kill every child now."""
        if self._stopping.is_set():
            self._kill_now.set()
        self._stopping.set()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc and c.proc.returncode is None]

    async def _terminate_all(self) -> None:
        live = [c for c in self._children if c.proc is not None and c.proc.returncode is None]
        if not live:
            return
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        longest = max(self._stop_timeout(c) for c in live)
        self.note(f"stopping: {len(live)} process(es) drain for up to {longest:.0f}s")
        await asyncio.gather(*(self._await_exit(c) for c in live))

    def _stop_timeout(self, child: _Child) -> float:
        timeout = child.spec.stop_timeout
        return self._grace if timeout is None else timeout

    async def _await_exit(self, child: _Child) -> None:
        proc = child.proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())
        kill = asyncio.ensure_future(self._kill_now.wait())
        await asyncio.wait(
            {exited, kill}, timeout=self._stop_timeout(child), return_when="FIRST_COMPLETED"
        )
        kill.cancel()
        if proc.returncode is None:
            why = (
                "a second stop"
                if self._kill_now.is_set()
                else (f"did not stop in {self._stop_timeout(child):.0f}s")
            )
            self.note(f"{child.spec.label}: {why}; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await exited
