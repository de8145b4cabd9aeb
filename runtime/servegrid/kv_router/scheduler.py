"""Worker selection: the cost of sending a prompt to each worker, and the load it counts.

    cost(worker) = overlap_score_weight * new_prefill_blocks + active_decode_blocks

``new_prefill_blocks`` is the prompt's blocks minus those the worker already holds;
``active_decode_blocks`` is the worker's last reported active blocks plus what this router
sent it since and the worker's reports do not yet cover. The lowest cost wins, ties at
random; with a temperature above zero the choice is sampled from a softmax over the costs
normalised to [0, 1], so a little load spreads even between equally good workers.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from servegrid.kv_router.protocol import LoadReport

#: how long the router counts a request it sent that no load report has covered yet
INFLIGHT_TTL = 5.0


class LoadTracker:
    """Per worker: the last reported active blocks plus this router's uncovered sends."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._reported: dict[int, int] = {}
        self._pending: dict[int, OrderedDict[str, tuple[int, float]]] = {}
        self._pending_blocks: dict[int, int] = {}

    def on_report(self, report: LoadReport) -> None:
        worker = report.worker_id
        self._reported[worker] = report.active_blocks
        pending = self._pending.get(worker)
        if pending:
            covered = 0
            for request_id in report.received:
                entry = pending.pop(request_id, None)
                if entry is not None:
                    covered += entry[0]
            self._pending_blocks[worker] -= covered

    def routed(self, worker: int, request_id: str, blocks: int) -> None:
        pending = self._pending.setdefault(worker, OrderedDict())
        if request_id in pending:  # the same id routed again: count it once
            self._pending_blocks[worker] -= pending.pop(request_id)[0]
        pending[request_id] = (blocks, self._clock() + INFLIGHT_TTL)
        self._pending_blocks[worker] = self._pending_blocks.get(worker, 0) + blocks

    def active_blocks(self, worker: int) -> int:
        pending = self._pending.get(worker)
        if pending:
            now = self._clock()
            while pending:
                request_id, (blocks, until) = next(iter(pending.items()))
                if until > now:
                    break
                del pending[request_id]
                self._pending_blocks[worker] -= blocks
        return self._reported.get(worker, 0) + self._pending_blocks.get(worker, 0)

    def pending_blocks(self, worker: int) -> int:
        return self._pending_blocks.get(worker, 0)

    def forget(self, worker: int) -> None:
        self._reported.pop(worker, None)
        self._pending.pop(worker, None)
        self._pending_blocks.pop(worker, None)


def costs(
    workers: Sequence[int],
    overlaps: Mapping[int, int],
    prompt_blocks: int,
    active_blocks: Callable[[int], int],
    overlap_score_weight: float,
) -> list[float]:
    return [
        overlap_score_weight * (prompt_blocks - overlaps.get(w, 0)) + active_blocks(w)
        for w in workers
    ]


def choose(
    workers: Sequence[int],
    worker_costs: Sequence[float],
    temperature: float,
    rng: random.Random,
) -> int:
    """The worker to use: lowest cost (ties at random), or sampled when ``temperature > 0``."""
    if not workers:
        raise ValueError("no workers to choose from")
    lo = min(worker_costs)
    if temperature <= 0:
        best = [w for w, c in zip(workers, worker_costs, strict=True) if c == lo]
        return best[0] if len(best) == 1 else rng.choice(best)
    hi = max(worker_costs)
    if hi == lo:
        return rng.choice(list(workers))
    span = hi - lo
    weights = [math.exp(-(c - lo) / span / temperature) for c in worker_costs]
    return rng.choices(list(workers), weights=weights)[0]
