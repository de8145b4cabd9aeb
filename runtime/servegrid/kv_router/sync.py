"""Keep the index in step with each worker's numbered event batches.

Batches of one worker are applied in sequence order. A number other than ``last + 1`` (a
lost or reordered frame), or a worker never seen before (this router just started), marks
the worker out of sync: its batches are held back, a snapshot of its blocks is requested,
and once it arrives the worker's entries are replaced by it and the held batches numbered
after the snapshot are replayed. Replaying a batch the snapshot already reflects changes
nothing (stores and removals are idempotent), so the snapshot need not be exact to the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from servegrid.kv_router.indexer import KvIndexer
from servegrid.kv_router.protocol import KvEventBatch, KvSnapshot

MAX_HELD = 10_000  # batches held for one worker while its snapshot is on the way


@dataclass(slots=True)
class _WorkerState:
    last_seq: int = 0
    synced: bool = False
    resyncing: bool = False
    held: list[KvEventBatch] = field(default_factory=list)


class EventSync:
    """Applies batches to ``indexer``; calls ``request_snapshot(worker)`` when out of step."""

    def __init__(self, indexer: KvIndexer, request_snapshot: Callable[[int], None]) -> None:
        self.indexer = indexer
        self._request_snapshot = request_snapshot
        self._workers: dict[int, _WorkerState] = {}
        self.gaps = 0  # times a worker was found out of step (new workers included)
        self.stale = 0  # batches dropped as already applied
        self.applied = 0  # events applied

    def on_batch(self, batch: KvEventBatch) -> None:
        state = self._workers.get(batch.worker_id)
        if state is None:
            state = self._workers[batch.worker_id] = _WorkerState()
        if state.synced:
            if batch.seq == state.last_seq + 1:
                self._apply(batch)
                state.last_seq = batch.seq
                return
            if batch.seq <= state.last_seq:
                self.stale += 1
                return
            state.synced = False  # a gap: fall through to hold and re-synchronise
        if len(state.held) >= MAX_HELD:
            state.held.clear()  # the snapshot on its way covers them all the same
        state.held.append(batch)
        self.request(batch.worker_id)

    def request(self, worker: int) -> None:
        """Ask for a snapshot of ``worker`` unless one is already on its way."""
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _WorkerState()
        if state.resyncing:
            return
        state.resyncing = True
        self.gaps += 1
        self._request_snapshot(worker)

    def on_snapshot(self, worker: int, snapshot: KvSnapshot) -> None:
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _WorkerState()
        self.indexer.clear(worker)
        self.indexer.store(worker, snapshot.block_hashes)
        state.last_seq = snapshot.seq
        state.synced = True
        state.resyncing = False
        held = sorted((b for b in state.held if b.seq > snapshot.seq), key=lambda b: b.seq)
        state.held = []
        for batch in held:
            self.on_batch(batch)

    def on_snapshot_failed(self, worker: int) -> None:
        """The request failed; the next batch or membership check asks again."""
        state = self._workers.get(worker)
        if state is not None:
            state.resyncing = False

    def in_sync(self, worker: int) -> bool:
        state = self._workers.get(worker)
        return state is not None and state.synced

    def resyncing(self, worker: int) -> bool:
        state = self._workers.get(worker)
        return state is not None and state.resyncing

    def forget(self, worker: int) -> None:
        self._workers.pop(worker, None)
        self.indexer.remove_worker(worker)

    def _apply(self, batch: KvEventBatch) -> None:
        apply = self.indexer.apply
        worker = batch.worker_id
        for event in batch.events:
            apply(worker, event)
        self.applied += len(batch.events)
