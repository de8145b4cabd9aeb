"""The torch engine's paged KV cache: one tensor of fixed-size blocks, and their bookkeeping.

Storage is ``[num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``: every
block is one contiguous piece of memory holding all layers' keys and values of its
``block_size`` token positions. That makes a block the unit of everything: a sequence holds a
list of block ids, a cached prefix is shared by pointing at the same blocks, and a KV
transfer ships each block as one segment of bytes.

Which block is free, cached by hash or evictable is the same bookkeeping the mocker uses
(``mocker.kv_cache.BlockPool``), so both engines report identical KV events for identical
traffic.
"""

from __future__ import annotations

import torch

from servegrid.engines.mocker.kv_cache import BlockPool


class PagedKvCache:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_layers = num_layers
        self.pool = BlockPool(num_blocks)
        self.tensor = torch.zeros(
            (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim),
            dtype=dtype,
            device=device,
        )

    @property
    def bytes_per_block(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    def gather(
        self, layer: int, block_index: torch.Tensor, offset_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``(block, offset)`` index pairs of any shape ``S``: ``S + [H, D]``."""
        kv = self.tensor[block_index, layer, :, offset_index]  # S + [2, H, D]
        return kv.select(-3, 0), kv.select(-3, 1)

    def scatter(
        self,
        layer: int,
        block_index: torch.Tensor,
        offset_index: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Store ``[N, H, D]`` keys and values at ``N`` ``(block, offset)`` positions."""
        self.tensor[block_index, layer, 0, offset_index] = keys
        self.tensor[block_index, layer, 1, offset_index] = values
