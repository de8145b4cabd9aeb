"""Chained hashes of full KV-cache blocks of token ids.

A block's hash covers its own token ids *and* its parent's hash, so equal hashes mean equal
prefixes, not merely equal blocks. Engines (the mocker's prefix cache) and the KV router's
indexer must agree on these numbers across processes and hosts, so the hash is a keyed
BLAKE2b digest of fixed-width little-endian token ids, never Python's salted ``hash()``.
Results are unsigned 64-bit ints (they fit a msgpack uint64).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

# Changing this changes every hash: routers and workers of one deployment must agree.
_PERSON = b"servegrid-kv-v1"
_LITTLE = sys.byteorder == "little"
_ROOT = b"\x00" * 8  # the "parent" of a sequence's first block


def hash_block(token_ids: Sequence[int], parent_hash: int | None = None) -> int:
    """The hash of one block of token ids that follows the block hashed ``parent_hash``."""
    ids = array("I", token_ids)
    if not _LITTLE:
        ids.byteswap()
    h = blake2b(
        _ROOT if parent_hash is None else parent_hash.to_bytes(8, "little"),
        digest_size=8,
        person=_PERSON,
    )
    h.update(ids)
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Hashes of every *full* block of ``token_ids``, parent first; a partial tail is ignored.

    ``parent_hash`` continues a chain (the hash of the block just before ``token_ids``).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    ids = array("I", token_ids)
    if not _LITTLE:
        ids.byteswap()
    raw = memoryview(ids).cast("B")
    step = block_size * 4
    full = (len(ids) // block_size) * step
    parent = _ROOT if parent_hash is None else parent_hash.to_bytes(8, "little")
    out: list[int] = []
    append = out.append
    for start in range(0, full, step):
        h = blake2b(parent, digest_size=8, person=_PERSON)
        h.update(raw[start : start + step])
        parent = h.digest()
        append(int.from_bytes(parent, "little"))
    return out
