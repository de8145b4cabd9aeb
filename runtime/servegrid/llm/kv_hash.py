"""Chained hashes of full KV-cache blocks of token ids.

A block's hash covers its own token ids *and* its parent's hash, so equal hashes mean equal
prefixes, not merely equal blocks. Engines (the mocker's prefix cache) and the KV router's
indexer must agree on these numbers across processes and hosts, so the hash is XXH3-64
(fast, non-cryptographic, the same on every platform) of the block's token ids packed as
fixed-width little-endian uint32, seeded with the parent's hash; never Python's salted
``hash()``. The router hashes every prompt it routes, so this is on its hot path: one C
call per block over a view of one packed buffer, no per-block copies. Results are unsigned
64-bit ints (they fit a msgpack uint64).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

from xxhash import xxh3_64_intdigest

# The seed of a sequence's first block, standing for "no parent". Changing it (or the
# packing) changes every hash: routers and workers of one deployment must agree.
_ROOT = 0x73677276_6B763032  # b"sgrvkv02"
_LITTLE = sys.byteorder == "little"


def _packed(token_ids: Sequence[int]) -> array:
    ids = array("I", token_ids)
    if not _LITTLE:
        ids.byteswap()
    return ids


def hash_block(token_ids: Sequence[int], parent_hash: int | None = None) -> int:
    """The hash of one block of token ids that follows the block hashed ``parent_hash``."""
    return xxh3_64_intdigest(_packed(token_ids), _ROOT if parent_hash is None else parent_hash)


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Hashes of every *full* block of ``token_ids``, parent first; a partial tail is ignored.

    ``parent_hash`` continues a chain (the hash of the block just before ``token_ids``).
    Equal to hashing each block with ``hash_block`` and its parent, only faster.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    raw = memoryview(_packed(token_ids)).cast("B")
    step = block_size * 4
    full = (len(raw) // step) * step
    parent = _ROOT if parent_hash is None else parent_hash
    out: list[int] = []
    append = out.append
    for start in range(0, full, step):
        parent = xxh3_64_intdigest(raw[start : start + step], parent)
        append(parent)
    return out
