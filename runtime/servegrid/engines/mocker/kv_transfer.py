"""The mocker in disaggregated serving: KV blocks reserved, filled by descriptor, decoded on.

The mocker holds no tensors, so what moves is a descriptor (with ``kv-transfer-bytes: true``,
also as many zero bytes as the real KV would have, to exercise the bulk path for real): the
decode side reserves real blocks of its pool, and committing a transfer marks the prompt's
tokens computed and offers its full blocks to the prefix cache, which reports them as
``stored`` KV events exactly as a local prefill would. The transfer's cost is simulated by
the transfer layer from ``kv_layout()`` (the model's ``config.json``) and the configured
bandwidth.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from servegrid.engines.base import EngineOutput, EngineRequest
from servegrid.engines.disagg import (
    KvLayout,
    KvReservation,
    KvTransferEngine,
    PrefilledKv,
    prefill_only,
)
from servegrid.engines.mocker.engine import _DONE, _RUNNING, MockerEngine, _Seq

_RESERVED = 3  # holds blocks outside the scheduler's queues, waiting for remote KV

# Without a model directory: a ~1B llama (16 layers, 8 KV heads of 64, bf16), 32 KiB a token.
DEFAULT_LAYOUT = KvLayout(num_layers=16, num_kv_heads=8, head_size=64, dtype_bytes=2)


class KvTransferError(RuntimeError):
    """A reservation cannot take the transfer (released meanwhile, or wrong shape)."""


class KvTransferMocker(MockerEngine, KvTransferEngine):
    """The mocker engine with the disaggregation interface (``engines.disagg``)."""

    _layout: KvLayout | None = None
    # kv-transfer-bytes: the bytes carry nothing, so one zeroed buffer serves every transfer
    # (sent from, received into) instead of fresh memory each time.
    _scratch: bytearray = bytearray()

    def _scratch_view(self, size: int) -> memoryview:
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        return memoryview(self._scratch)[:size]

    def kv_layout(self) -> KvLayout:
        if self._layout is None:
            self._layout = _model_layout(self.config.model)
        return self._layout

    # -- decode side ---------------------------------------------------------------------
    def reserve_kv(self, request: EngineRequest) -> KvReservation | None:
        seq = self._new_seq(request)
        pool, bs = self._pool, self._bs
        num_tokens = len(seq.tokens) - 1  # the last prompt token is computed here
        hit = pool.acquire_prefix(seq.hashes[: num_tokens // bs])
        first = len(hit) * bs
        need = -(-num_tokens // bs) - len(hit)
        if first >= num_tokens or need > pool.num_available:
            pool.release(hit)
            return None
        blocks = hit + [pool.allocate() for _ in range(need)]
        seq.blocks = blocks
        seq.num_computed = first
        seq.num_committed = len(hit)
        seq.cached_tokens = first
        seq.status = _RESERVED
        return KvReservation(request, first, num_tokens, blocks[len(hit) :], seq)

    def kv_buffers(self, reservation: KvReservation, sizes: list[int]) -> list[memoryview]:
        if not sizes:
            return []
        if not self.config.kv_transfer_bytes:
            raise KvTransferError(
                "this mocker takes descriptors, not bytes (kv-transfer-bytes is off here)"
            )
        expected = self.kv_layout().bytes_for(reservation.num_tokens - reservation.first_token)
        if sum(sizes) != expected:
            raise KvTransferError(f"{sum(sizes)} bytes of KV sent, {expected} reserved")
        return [self._scratch_view(size) for size in sizes]

    def commit_kv(self, reservation: KvReservation) -> None:
        seq: _Seq = reservation.state
        if seq.status != _RESERVED:
            raise KvTransferError(f"request {reservation.request.request_id}: reservation gone")
        seq.num_computed = reservation.num_tokens
        if self.config.enable_prefix_caching:
            self._pool.commit_sequence(seq, reservation.num_tokens // self._bs, self._bs)
        reservation.committed = True
        self._emit_events()  # the blocks are this worker's now: say so without waiting a step

    def generate_reserved(self, reservation: KvReservation) -> AsyncIterator[EngineOutput]:
        if not reservation.committed:
            raise KvTransferError(
                f"request {reservation.request.request_id}: no KV was committed to decode from"
            )
        return self._stream(lambda: self._resume(reservation.state))

    def _resume(self, seq: _Seq) -> _Seq:
        if seq.status != _RESERVED:
            raise KvTransferError("the reservation was released before decoding started")
        # Straight to running: its prompt is computed up to the last token, which the next
        # step computes (a one-token prefill) before sampling the first output token.
        seq.status = _RUNNING
        self._running.append(seq)
        self._ensure_started()
        self._wake.set()
        return seq

    def release_kv(self, reservation: KvReservation) -> None:
        seq: _Seq = reservation.state
        if seq.status == _RESERVED:
            self._pool.release(seq.blocks)
            seq.blocks = []
            seq.status = _DONE
            self._emit_events()

    # -- prefill side --------------------------------------------------------------------
    async def prefill_kv(
        self, request: EngineRequest, first_token: int, num_tokens: int
    ) -> PrefilledKv:
        # A real prefill through the scheduler (batched with other prefills, chunked, timed);
        # the computed blocks stay in this worker's prefix cache afterwards.
        prefill = prefill_only(request)
        async for _ in self.generate(prefill):
            pass
        logical = self.kv_layout().bytes_for(num_tokens - first_token)
        segments = [self._scratch_view(logical)] if self.config.kv_transfer_bytes else []
        return PrefilledKv(first_token, num_tokens, logical, segments)


def _model_layout(model: str | None) -> KvLayout:
    if not model:
        return DEFAULT_LAYOUT
    from servegrid.llm.model_init import ensure_model

    path = ensure_model(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return DEFAULT_LAYOUT
    return KvLayout.from_model_config(config, str(path))
