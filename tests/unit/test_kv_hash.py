"""Chained KV block hashes: stable, prefix-sensitive, and consistent between helpers."""

from __future__ import annotations

import os
import subprocess
import sys

from servegrid.llm.kv_hash import block_hashes, hash_block


def test_only_full_blocks_are_hashed():
    assert len(block_hashes(list(range(47)), 16)) == 2
    assert block_hashes(list(range(15)), 16) == []


def test_chain_equals_hashing_each_block_with_its_parent():
    ids = list(range(1000, 1064))
    chain = block_hashes(ids, 16)
    parent = None
    for i, h in enumerate(chain):
        assert hash_block(ids[i * 16 : (i + 1) * 16], parent) == h
        parent = h
    assert block_hashes(ids[32:], 16, parent_hash=chain[1]) == chain[2:]


def test_equal_blocks_after_different_prefixes_hash_differently():
    block = [5] * 16
    a = block_hashes([1] * 16 + block, 16)
    b = block_hashes([2] * 16 + block, 16)
    assert a[1] != b[1]
    assert block_hashes([1] * 16 + block, 16) == a


def test_hashes_are_unsigned_64_bit_and_stable_across_processes():
    ids = [3, 1, 4, 1, 5, 9, 2, 6] * 4
    here = block_hashes(ids, 8)
    assert all(0 <= h < 2**64 for h in here)
    code = f"from servegrid.llm.kv_hash import block_hashes; print(block_hashes({ids!r}, 8))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
        )
        assert out.stdout.strip() == repr(here)


def test_the_hash_is_xxh3_64_of_packed_little_endian_uint32_seeded_with_the_parent():
    """The definition another engine (in any language) must reproduce to be routable."""
    import struct

    from xxhash import xxh3_64_intdigest

    from servegrid.llm import kv_hash

    ids = [70000, 0, 1, 2**32 - 1]  # ids need all four bytes
    first = xxh3_64_intdigest(struct.pack("<4I", *ids), seed=kv_hash._ROOT)
    second = xxh3_64_intdigest(struct.pack("<4I", *ids[::-1]), seed=first)
    assert block_hashes(ids + ids[::-1], 4) == [first, second]
    assert hash_block(ids) == first and hash_block(ids[::-1], first) == second


def test_every_token_of_a_block_counts():
    ids = list(range(100, 116))
    base = hash_block(ids)
    for i in range(16):
        changed = [*ids]
        changed[i] += 1
        assert hash_block(changed) != base
    assert hash_block([1, 0]) != hash_block([256, 0])  # packed as uint32, not bytes
