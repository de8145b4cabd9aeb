"""Which workers hold which KV blocks, and how much of a prompt each one already has.

Block hashes are chained (``llm.kv_hash``): a hash names a whole prefix, so the radix tree of
cached prefixes collapses into one map from block hash to the workers holding that block (a
node of the tree is its hash; its children are the hashes chained on it). A prompt's
overlap with a worker is the number of its leading blocks that worker holds, found by walking
the prompt's hashes and narrowing the set of workers still matching: time proportional to
the prompt's blocks (times the workers still matching), never to the cached blocks.

``ApproxIndexer`` is the same index fed by the router's own decisions instead of events, for
engines that publish none: what was sent to a worker is assumed cached there for ``ttl``
seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from servegrid.engines.base import CLEARED, REMOVED, STORED, KvEvent


class KvIndexer:
    __slots__ = ("_holders", "_worker_blocks")

    def __init__(self) -> None:
        self._holders: dict[int, set[int]] = {}  # block hash -> workers holding it
        self._worker_blocks: dict[int, set[int]] = {}  # worker -> its block hashes

    # -- updates ---------------------------------------------------------------------------
    def store(self, worker: int, hashes: Iterable[int]) -> None:
        holders = self._holders
        mine = self._worker_blocks.setdefault(worker, set())
        for h in hashes:
            if h in mine:
                continue
            mine.add(h)
            workers = holders.get(h)
            if workers is None:
                holders[h] = {worker}
            else:
                workers.add(worker)

    def remove(self, worker: int, hashes: Iterable[int]) -> None:
        mine = self._worker_blocks.get(worker)
        if not mine:
            return
        holders = self._holders
        for h in hashes:
            if h not in mine:
                continue
            mine.discard(h)
            workers = holders[h]
            workers.discard(worker)
            if not workers:
                del holders[h]

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
        matching = set(first)
        scores: dict[int, int] = {}
        depth = 1
        for h in hashes[1:]:
            workers = holders.get(h)
            if workers is None:
                break
            if not matching <= workers:
                for w in matching - workers:
                    scores[w] = depth
                matching &= workers
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
