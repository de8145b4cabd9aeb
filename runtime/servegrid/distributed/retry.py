"""One backoff policy for every retry loop: exponential growth, a cap, and jitter.

Jitter matters in a cluster: when etcd or NATS comes back, every process that lost it would
otherwise retry in the same instant. Each delay is drawn from ``[delay*(1-jitter), delay]``.

    backoff = Backoff(start=0.5, maximum=15.0)
    while True:
        try:
            ...
            backoff.reset()
        except SomeError:
            await backoff.sleep()
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    start: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2  # fraction of the delay that is randomised away
    _current: float = field(init=False, default=0.0)
    attempts: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.start <= 0 or self.maximum < self.start:
            raise ValueError(f"need 0 < start <= maximum, got {self.start}, {self.maximum}")
        self._current = self.start

    def next_delay(self) -> float:
        """The delay to wait before the next attempt; each call grows the next one."""
        delay = self._current
        self._current = min(self.maximum, self._current * self.factor)
        self.attempts += 1
        return delay * (1.0 - self.jitter * random.random())

    def peek(self) -> float:
        """The un-jittered delay ``next_delay`` would draw from (for messages)."""
        return self._current

    def reset(self) -> None:
        """Back to ``start`` (after a success)."""
        self._current = self.start
        self.attempts = 0

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay
