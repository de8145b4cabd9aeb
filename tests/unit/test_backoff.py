"""The one backoff policy (distributed/retry.py) and the supervisor's use of it."""

from __future__ import annotations

import sys

import pytest

from servegrid.cli import supervisor as supervisor_module
from servegrid.cli.supervisor import ProcessSpec, Supervisor
from servegrid.distributed.retry import Backoff


def test_delays_double_up_to_the_cap_with_bounded_jitter_and_reset():
    backoff = Backoff(start=0.5, maximum=4.0, jitter=0.2)
    nominal = [0.5, 1.0, 2.0, 4.0, 4.0]
    for expected in nominal:
        delay = backoff.next_delay()
        assert expected * 0.8 <= delay <= expected
    backoff.reset()
    assert 0.4 <= backoff.next_delay() <= 0.5


def test_jitter_spreads_retries():
    delays = {Backoff(start=1.0, maximum=1.0).next_delay() for _ in range(20)}
    assert len(delays) > 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Backoff(start=0)
    with pytest.raises(ValueError):
        Backoff(jitter=1.0)


class _Recorder(Supervisor):
    def __init__(self, specs: list[ProcessSpec]) -> None:
        super().__init__(specs)
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)
        if sum("restarting in" in n for n in self.notes) >= 4:
            self.stop()


async def test_supervisor_restarts_a_crashing_child_with_growing_backoff(monkeypatch):
    monkeypatch.setattr(supervisor_module, "BACKOFF_START", 0.05)
    monkeypatch.setattr(supervisor_module, "BACKOFF_MAX", 0.2)
    crash = ProcessSpec("crash", [sys.executable, "-c", "raise SystemExit(1)"])
    sup = _Recorder([crash])
    await sup.run()
    delays = [
        float(n.rsplit("restarting in ", 1)[1].rstrip("s"))
        for n in sup.notes
        if "restarting in" in n
    ]
    assert len(delays) == 4
    assert "exit status 1" in sup.notes[0]
    # 0.05, 0.1, 0.2, 0.2 (capped), each less up to 20% jitter; printed to 0.1 s
    for shown, nominal in zip(delays, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert round(nominal * 0.8, 1) - 0.05 <= shown <= nominal + 0.05
    assert sup._children[0].restarts == 4


async def test_a_child_reporting_a_config_error_stops_the_graph_without_restarts():
    bad = ProcessSpec("bad", [sys.executable, "-c", "raise SystemExit(2)"])
    sup = _Recorder([bad])
    await sup.run()
    assert sup.failed
    assert sup._children[0].restarts == 0
