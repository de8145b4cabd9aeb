"""Run ``servegrid serve`` as a user would, for tests; always stop what was started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import descendants_of, kill_quietly, wait_gone

REPO = Path(__file__).resolve().parents[2]
SERVEGRID = [sys.executable, "-m", "servegrid.cli"]


@dataclass
class ServedGraph:
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return "\n".join(self.output)

    def wait_for_output(self, needle: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"servegrid serve exited ({self.proc.returncode}):\n{self.text()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} x{count} not seen in {timeout}s:\n{self.text()}")

    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGTERM the supervisor; return the descendant PIDs that outlived it (should be [])."""
        before = descendants_of(self.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return wait_gone(before, 5.0)


@contextmanager
def serve(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
) -> Iterator[ServedGraph]:
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [*SERVEGRID, "serve", *args],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = ServedGraph(proc)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            served.output.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield served
    finally:
        left = served.stop()
        for pid in left:  # never leave a process behind, even when a test failed
            kill_quietly(pid, signal.SIGKILL)
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()
        reader.join(5)
