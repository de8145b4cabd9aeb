"""Which workers hold which KV blocks, and how much of a prompt each one already has.

Block hashes are chained (``llm.kv_hash``): a hash names a whole prefix, so the radix tree of
cached prefixes collapses into one map from block hash to the workers holding that block (a
node of the tree is its hash; its children are the hashes chained on it). A prompt's
overlap with a worker is the number of its leading blocks that worker holds, found by walking
the prompt's hashes and narrowing the set of workers still matching: time proportional to
the prompt's blocks (times the workers still matching), never to the cached blocks.

Holder sets are immutable and shared: every block held by the same workers maps to one
``frozenset`` object (most blocks have one holder, so there are about as many sets as
workers, not one per block). The walk then skips the set comparison whenever a block's
holders are the very object the previous block had, which is the rule along a cached
conversation, and the index holds ~100k ints rather than ~100k sets for the garbage
collector to scan.

``ApproxIndexer`` is the same index fed by the router's own decisions instead of events, for
engines that publish none: what was sent to a worker is assumed cached there for ``ttl``
seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from servegrid.engines.base import CLEARED, REMOVED, STORED, KvEvent

#: interned holder sets kept before the unused ones are dropped (see ``KvIndexer._intern``)
_INTERNED_MIN = 4096


class KvIndexer:
    __slots__ = ("_alone", "_holders", "_interned", "_live_sets", "_worker_blocks")

    def __init__(self) -> None:
        self._holders: dict[int, frozenset[int]] = {}  # block hash -> workers (shared sets)
        self._worker_blocks: dict[int, set[int]] = {}  # worker -> its block hashes
        self._alone: dict[int, frozenset[int]] = {}  # worker -> the set of just that worker
        self._interned: dict[frozenset[int], frozenset[int]] = {}  # the sets of 2+ workers
        self._live_sets = 0  # interned sets in use at the last clean-up

    def _intern(self, workers: frozenset[int]) -> frozenset[int]:
        """The one shared object equal to ``workers``. Sets no block uses any more are
        dropped once the table has doubled since the last clean-up (amortised O(1))."""
        if len(workers) == 1:
            [worker] = workers
            alone = self._alone.get(worker)
            if alone is None:
                alone = self._alone[worker] = workers
            return alone
        interned = self._interned
        found = interned.get(workers)
        if found is not None:
            return found
        if len(interned) >= max(_INTERNED_MIN, 2 * self._live_sets):
            live = {s for s in self._holders.values() if len(s) > 1}
            self._interned = interned = {s: s for s in live}
            self._live_sets = len(live)
        interned[workers] = workers
        return workers

    # -- updates ---------------------------------------------------------------------------
    def store(self, worker: int, hashes: Iterable[int]) -> None:
        holders = self._holders
        mine = self._worker_blocks.setdefault(worker, set())
        alone = self._alone.get(worker) or self._intern(frozenset((worker,)))
        for h in hashes:
            if h in mine:
                continue
            mine.add(h)
            workers = holders.get(h)
            holders[h] = alone if workers is None else self._intern(workers | alone)

    def remove(self, worker: int, hashes: Iterable[int]) -> None:
        mine = self._worker_blocks.get(worker)
        if not mine:
            return
        holders = self._holders
        alone = self._alone.get(worker)
        for h in hashes:
            if h not in mine:
                continue
            mine.discard(h)
            workers = holders[h]
            if workers is alone:
                del holders[h]
            else:
                holders[h] = self._intern(workers - alone)

    def clear(self, worker: int) -> None:
        """The worker's cache emptied; it stays known (with no blocks)."""
        mine = self._worker_blocks.get(worker)
        if mine:
            self.remove(worker, list(mine))

    def remove_worker(self, worker: int) -> None:
        """Forget the worker entirely (it left discovery)."""
        self.clear(worker)
        self._worker_blocks.pop(worker, None)

    def apply(self, worker: int, event: KvEvent) -> None:
        if event.kind == STORED:
            self.store(worker, event.block_hashes)
        elif event.kind == REMOVED:
            self.remove(worker, event.block_hashes)
        elif event.kind == CLEARED:
            self.clear(worker)

    # -- queries ---------------------------------------------------------------------------
    def overlaps(self, hashes: Sequence[int]) -> dict[int, int]:
        """For each worker holding the prompt's first block: how many leading blocks it holds.

        Workers absent from the result hold none.
        """
        holders = self._holders
        if not hashes:
            return {}
        first = holders.get(hashes[0])
        if not first:
            return {}
        matching = first
        last = first  # matching is a subset of the last holders seen
        scores: dict[int, int] = {}
        depth = 1
        for h in hashes[1:]:
            workers = holders.get(h)
            if workers is None:
                break
            if workers is not last:
                last = workers
                if not matching <= workers:
                    for w in matching - workers:
                        scores[w] = depth
                    matching = matching & workers
                    if not matching:
                        return scores
            depth += 1
        for w in matching:
            scores[w] = depth
        return scores

    def workers(self) -> list[int]:
        return list(self._worker_blocks)

    def knows(self, worker: int) -> bool:
        return worker in self._worker_blocks

    def block_count(self, worker: int | None = None) -> int:
        """Blocks held by ``worker``, or distinct blocks held by any worker."""
        if worker is None:
            return len(self._holders)
        return len(self._worker_blocks.get(worker, ()))

    def blocks_of(self, worker: int) -> set[int]:
        return set(self._worker_blocks.get(worker, ()))


class ApproxIndexer(KvIndexer):
    """An index predicted from routing decisions: a routed prompt's blocks count as cached on
    the chosen worker until ``ttl`` seconds after they were last routed there."""

    __slots__ = ("_clock", "_expiry", "ttl")

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.ttl = ttl
        self._clock = clock
        # (worker, hash) -> expiry time, oldest first: one ttl for all keeps it sorted
        self._expiry: OrderedDict[tuple[int, int], float] = OrderedDict()

    def routed(self, worker: int, hashes: Sequence[int]) -> None:
        self.expire()
        until = self._clock() + self.ttl
        expiry = self._expiry
        for h in hashes:
            key = (worker, h)
            if key in expiry:
                expiry.move_to_end(key)
            expiry[key] = until
        self.store(worker, hashes)

    def expire(self) -> None:
        now = self._clock()
        expiry = self._expiry
        while expiry:
            key, until = next(iter(expiry.items()))
            if until > now:
                break
            del expiry[key]
            self.remove(key[0], (key[1],))

    def overlaps(self, hashes: Sequence[int]) -> dict[int, int]:
        self.expire()
        return super().overlaps(hashes)

    def remove_worker(self, worker: int) -> None:
        for key in [k for k in self._expiry if k[0] == worker]:
            del self._expiry[key]
        super().remove_worker(worker)
