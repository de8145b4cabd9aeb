"""Paged KV blocks with prefix caching and LRU eviction, as vLLM keeps them.

Blocks are numbered ``0..num_blocks-1``. A block in use has a reference count; a full,
computed block may also carry its chained hash (``llm.kv_hash``), which makes it findable
by later requests with the same prefix. When its last user lets go, a hashed block is
kept as *evictable* (most recently freed last) rather than freed; allocation takes truly
free blocks first, then evicts the least recently used evictable one. Stores and
evictions are collected here and reported once per scheduler step (``flush_events``).

The torch engine keeps its blocks with this pool too, so both engines cache and report
(``commit_sequence``, ``flush_events``) in one way: identical KV events for identical traffic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from servegrid.engines.base import KvEvent, KvEventSink
from servegrid.llm.kv_hash import hash_block


class CachedSequence(Protocol):
    """What ``BlockPool.commit_sequence`` reads and updates of an engine's sequence."""

    tokens: list[int]
    blocks: list[int]  # block ids, one per ``block_size`` tokens
    hashes: list[int]  # chained block hashes computed so far (grows as blocks fill)
    num_committed: int  # leading blocks already offered to the prefix cache
    lora: str | None  # the adapter its blocks are salted with


class BlockPool:
    __slots__ = (
        "_evictable",
        "_free",
        "block_hash",
        "cached",
        "num_blocks",
        "ref",
        "removed",
        "stored",
    )

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self.cached: dict[int, int] = {}  # hash -> block, referenced or not
        self._evictable: OrderedDict[int, int] = OrderedDict()  # hash -> block, LRU first
        # Since the last drain: hashes evicted, and (hashes, parent) chains stored.
        self.removed: list[int] = []
        self.stored: list[tuple[list[int], int | None]] = []

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_active(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def allocate(self) -> int:
        """One block for a sequence (reference count 1); the caller checked availability."""
        if self._free:
            block = self._free.pop()
        else:
            h, block = self._evictable.popitem(last=False)
            del self.cached[h]
            self.block_hash[block] = None
            self.removed.append(h)
        self.ref[block] = 1
        return block

    def acquire_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on the cached blocks of the longest cached prefix of ``hashes``."""
        blocks: list[int] = []
        cached, ref, evictable = self.cached, self.ref, self._evictable
        for h in hashes:
            block = cached.get(h)
            if block is None:
                break
            if ref[block] == 0:
                del evictable[h]
            ref[block] += 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; tail blocks become the first to be evicted."""
        ref, block_hash = self.ref, self.block_hash
        for block in reversed(blocks):
            n = ref[block] - 1
            ref[block] = n
            if n == 0:
                h = block_hash[block]
                if h is None:
                    self._free.append(block)
                else:
                    self._evictable[h] = block

    def commit(self, block: int, block_hash: int) -> bool:
        """Make a full block findable by its hash; False if an equal block is already cached."""
        if block_hash in self.cached:
            # Another sequence computed the same prefix meanwhile; this copy stays private
            # and is freed, not cached, when released.
            return False
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        return True

    def commit_sequence(self, seq: CachedSequence, full: int, block_size: int) -> None:
        """Offer ``seq``'s newly full blocks (up to ``full``) to the prefix cache.

        Each run of blocks this caches is recorded as one stored chain with its parent hash;
        a block another sequence already cached splits the run.
        """
        hashes = seq.hashes
        tokens = seq.tokens
        blocks = seq.blocks
        stored = self.stored
        commit = self.commit
        start = seq.num_committed
        new: list[int] = []
        parent = hashes[start - 1] if start else None
        chain_parent = parent
        for b in range(start, full):
            if b < len(hashes):
                h = hashes[b]
            else:
                h = hash_block(tokens[b * block_size : (b + 1) * block_size], parent, salt=seq.lora)
                hashes.append(h)
            if commit(blocks[b], h):
                if not new:
                    chain_parent = parent
                new.append(h)
            elif new:
                stored.append((new, chain_parent))
                new = []
            parent = h
        seq.num_committed = full
        if new:
            stored.append((new, chain_parent))

    def flush_events(self, sink: KvEventSink | None) -> None:
        """Report what was evicted and stored since the last flush (dropped without a sink)."""
        if not (self.removed or self.stored):
            return
        if sink is None:
            self.removed.clear()
            self.stored.clear()
            return
        if self.removed:
            removed, self.removed = self.removed, []
            sink(KvEvent("removed", removed))
        if self.stored:
            stored, self.stored = self.stored, []
            for hashes, parent in stored:
                sink(KvEvent("stored", hashes, parent))
