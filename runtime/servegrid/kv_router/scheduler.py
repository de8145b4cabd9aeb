"""Worker selection: the cost of sending a prompt to each worker, and the load it counts.

    cost(worker) = overlap_score_weight * new_prefill_blocks + active_decode_blocks

``new_prefill_blocks`` is the prompt's blocks minus those the worker already holds.
``active_decode_blocks`` is what the worker would hold active *with* this request (what
Dynamo calls potential active blocks): its last reported active blocks, plus what this router
sent it since that its reports do not yet cover, plus the blocks this request would add
there. A request adds the blocks of its prompt (and its first output token) that no
request running on that worker already uses: a system prompt shared by running requests
costs nothing more, but one held only in the evictable cache becomes active again. Which
prompt blocks are in use is known from the requests this router sent and the workers'
reports of which finished. Both terms are in blocks, so the weight is a true exchange rate.

The lowest cost wins, ties at random; with a temperature above zero the choice is sampled
from a softmax over the costs normalised to [0, 1], so a little load spreads even between
equally good workers.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat

from servegrid.kv_router.protocol import LoadReport

#: how long the router counts a request it sent that no load report has covered yet
INFLIGHT_TTL = 5.0
#: how long a request's prompt blocks count as in use when no report says it finished
ACTIVE_TTL = 300.0


class LoadTracker:
    """Per worker: active blocks (reported plus this router's uncovered sends) and which
    prompt blocks this router's running requests use there."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._reported: dict[int, int] = {}
        #: reported + uncovered sends, per worker: what ``costs`` reads
        self.load: dict[int, int] = {}
        # request -> (worker, blocks, until); one TTL for all keeps it oldest first
        self._pending: OrderedDict[str, tuple[int, int, float]] = OrderedDict()
        # request -> (worker, prompt block hashes, until), until reported finished
        self._running: OrderedDict[str, tuple[int, list[int], float]] = OrderedDict()
        self._in_use: dict[int, dict[int, int]] = {}  # block hash -> {worker: requests}

    # -- reports and sends -----------------------------------------------------------------
    def on_report(self, report: LoadReport) -> None:
        worker = report.worker_id
        load = self.load
        uncovered = load.get(worker, 0) - self._reported.get(worker, 0)
        pending = self._pending
        for request_id in report.received:
            entry = pending.get(request_id)
            if entry is not None and entry[0] == worker:
                del pending[request_id]
                uncovered -= entry[1]
        self._reported[worker] = report.active_blocks
        load[worker] = report.active_blocks + uncovered
        for request_id in report.finished:
            self._finish(request_id)

    def routed(
        self,
        worker: int,
        request_id: str,
        blocks: int,
        hashes: Sequence[int] = (),
        in_use_depth: int | None = None,
    ) -> None:
        """``request_id`` went to ``worker``, adding ``blocks`` active blocks there; its
        prompt's ``hashes`` are in use there until the worker reports it finished (tracked
        only for workers that report their load: the others never say). ``in_use_depth``:
        the most leading ``hashes`` ``in_use_prefix`` found in use on any worker, if known."""
        self._uncount(request_id)  # the same id routed again (a retry): count it once
        self._finish(request_id)
        now = self._clock()
        self._pending[request_id] = (worker, blocks, now + INFLIGHT_TTL)
        self.load[worker] = self.load.get(worker, 0) + blocks
        if hashes and worker in self._reported:
            self._running[request_id] = (worker, list(hashes), now + ACTIVE_TTL)
            in_use = self._in_use
            # Blocks in use form chains from a prompt's start, so past the deepest prefix in
            # use anywhere (``in_use_depth``, from this decision's walk) none is: add those
            # without looking.
            shared = len(hashes) if in_use_depth is None else in_use_depth
            for h in hashes[:shared]:
                users = in_use.get(h)
                if users is None:
                    in_use[h] = {worker: 1}
                else:
                    users[worker] = users.get(worker, 0) + 1
            if shared < len(hashes):
                in_use.update({h: {worker: 1} for h in hashes[shared:]})

    def expire(self) -> None:
        """Forget sends no report covered in time, and requests never reported finished."""
        now = self._clock()
        pending = self._pending
        while pending:
            request_id, (_, _, until) = next(iter(pending.items()))
            if until > now:
                break
            self._uncount(request_id)
        running = self._running
        while running:
            request_id, (_, _, until) = next(iter(running.items()))
            if until > now:
                break
            self._finish(request_id)

    def _uncount(self, request_id: str) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            worker, blocks, _ = entry
            if worker in self.load:
                self.load[worker] -= blocks

    def _finish(self, request_id: str) -> None:
        entry = self._running.pop(request_id, None)
        if entry is None:
            return
        worker, hashes, _ = entry
        in_use = self._in_use
        for h in hashes:
            users = in_use[h]
            n = users[worker] - 1
            if n:
                users[worker] = n
            else:
                del users[worker]
                if not users:
                    del in_use[h]

    # -- queries ---------------------------------------------------------------------------
    def in_use_prefix(self, hashes: Sequence[int]) -> dict[int, int]:
        """For each worker where this router's running requests use the prompt's first
        block: how many leading prompt blocks they use there."""
        in_use = self._in_use
        if not hashes or not in_use:
            return {}
        first = in_use.get(hashes[0])
        if not first:
            return {}
        # The indexer's walk (indexer.KvIndexer.overlaps), over the key views of the counts.
        matching = set(first)
        prefix: dict[int, int] = {}
        depth = 1
        for h in hashes[1:]:
            users = in_use.get(h)
            if users is None:
                break
            held = users.keys()
            if not matching <= held:
                for w in matching - held:
                    prefix[w] = depth
                matching &= held
                if not matching:
                    return prefix
            depth += 1
        for w in matching:
            prefix[w] = depth
        return prefix

    def active_blocks(self, worker: int) -> int:
        self.expire()
        return self.load.get(worker, 0)

    def pending_blocks(self, worker: int) -> int:
        self.expire()
        return self.load.get(worker, 0) - self._reported.get(worker, 0)

    def running(self, worker: int | None = None) -> int:
        """Requests this router counts as running (on ``worker``)."""
        if worker is None:
            return len(self._running)
        return sum(1 for w, _, _ in self._running.values() if w == worker)

    def forget(self, worker: int) -> None:
        self._reported.pop(worker, None)
        self.load.pop(worker, None)
        for request_id in [r for r, e in self._pending.items() if e[0] == worker]:
            del self._pending[request_id]
        for request_id in [r for r, e in self._running.items() if e[0] == worker]:
            self._finish(request_id)


def costs(
    workers: Sequence[int],
    overlaps: Mapping[int, int],
    in_use: Mapping[int, int],
    prompt_blocks: int,
    request_blocks: int,
    load: Mapping[int, int],
    overlap_score_weight: float,
) -> list[float]:
    """``cost(worker)`` for each of ``workers``.

    ``overlaps``: leading prompt blocks cached per worker; ``in_use``: leading prompt blocks
    running requests use per worker (both absent: none); ``request_blocks``: the blocks the
    request holds once admitted; ``load``: active blocks per worker (absent: none).
    Without overlap or blocks in use anywhere the workers differ only in their load.
    """
    # One C-level pass per term (map over dict.get), one Python pass to add them up.
    n = len(workers)
    loads = list(map(load.get, workers, repeat(0, n)))
    base = overlap_score_weight * prompt_blocks + request_blocks
    if not overlaps and not in_use:
        return [base + x for x in loads]
    cached = map(overlaps.get, workers, repeat(0, n))
    used = map(in_use.get, workers, repeat(0, n))
    w = overlap_score_weight
    return [base + x - w * c - u for x, c, u in zip(loads, cached, used, strict=True)]


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
        if worker_costs.count(lo) == 1:
            return workers[worker_costs.index(lo)]
        return rng.choice([w for w, c in zip(workers, worker_costs, strict=True) if c == lo])
    hi = max(worker_costs)
    if hi == lo:
        return rng.choice(list(workers))
    span = hi - lo
    weights = [math.exp(-(c - lo) / span / temperature) for c in worker_costs]
    return rng.choices(list(workers), weights=weights)[0]
