"""The torch engine: a continuous-batching scheduler on the event loop, the model on a thread.

One asyncio task runs the scheduler loop. Each step it (1) keeps running sequences going,
preempting the newest (recompute later) when KV blocks run out, (2) admits waiting
sequences while ``max-num-seqs``, the ``max-num-batched-tokens`` budget and free blocks
allow, reusing the blocks of their prompt's longest cached prefix (found by chained block
hash, ``llm.kv_hash``), (3) hands the step to the compute thread (``runner.ModelRunner``)
and awaits it, so the event loop keeps serving requests, heartbeats and KV events while the
model runs, then (4) records what was computed, offers blocks that became full to the prefix
cache (``stored`` KV events, the same as the mocker's), and appends the sampled tokens.

A step runs every decoding sequence in one batched forward pass, and every prompt chunk in
a pass of its own (a long prompt padded to a batch of one-token decodes would waste most of
the pass). The last prompt token is always computed, never taken from the cache, because
its logits choose the first output token (vLLM does the same).

Sequences finish with ``"stop"`` on one of the request's ``stop_token_ids`` (the processor
puts the model's EOS ids there) and ``"length"`` at ``max_tokens`` or ``max-model-len``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from servegrid.engines.base import (
    Engine,
    EngineConfigError,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    KvEventSink,
    LoadMetrics,
    PromptTooLongError,
)
from servegrid.engines.disagg import (
    KvLayout,
    KvReservation,
    KvTransferEngine,
    PrefilledKv,
    prefill_only,
)
from servegrid.engines.torch.config import TorchConfig
from servegrid.engines.torch.kv_cache import PagedKvCache
from servegrid.engines.torch.runner import BatchRow, ModelRunner
from servegrid.engines.torch.sampling import generator_for
from servegrid.llm.kv_hash import block_hashes

log = logging.getLogger(__name__)

WAITING, RUNNING, DONE, RESERVED = 0, 1, 2, 3
# Default cache size: room for this many sequences of max-model-len at once.
_DEFAULT_FULL_SEQS = 4


class EngineDeadError(RuntimeError):
    """The engine was stopped, failed to start, or its scheduler loop crashed."""


class ForwardError(RuntimeError):
    """The model's forward pass failed for the step this request was in."""


class Seq:
    """One request's state; only the event loop mutates it."""

    __slots__ = (
        "blocks",
        "cached_tokens",
        "error",
        "finish",
        "generated",
        "generator",
        "hashes",
        "keep_blocks",
        "lora",
        "max_len",
        "max_tokens",
        "num_committed",
        "num_computed",
        "out",
        "request_id",
        "status",
        "stop_ids",
        "temperature",
        "tokens",
        "top_p",
        "waiter",
    )

    def __init__(self, request: EngineRequest, max_len: int, engine_seed: int, bs: int) -> None:
        sp = request.sampling
        self.request_id = request.request_id
        self.tokens = list(request.token_ids)  # prompt + generated
        self.max_tokens = sp.max_tokens
        self.max_len = max_len
        self.stop_ids = frozenset(sp.stop_token_ids)
        self.temperature = sp.temperature
        self.top_p = sp.top_p
        self.generator = generator_for(sp.seed, request.request_id, engine_seed)
        self.lora = request.lora_name
        # Salted with the adapter: KV computed under one adapter is never reused by another.
        self.hashes = block_hashes(self.tokens, bs, salt=self.lora)  # grows as blocks fill
        self.blocks: list[int] = []
        self.num_computed = 0  # tokens whose KV is in ``blocks``
        self.num_committed = 0  # leading blocks already offered to the prefix cache
        self.generated = 0
        self.cached_tokens = -1  # unknown until first admitted
        self.status = WAITING
        self.out: list[int] = []  # generated ids the consumer has not taken yet
        self.finish: str | None = None
        self.error: str | None = None
        self.waiter: asyncio.Future[None] | None = None
        # A prefill for another worker: its blocks outlive the sequence until shipped.
        self.keep_blocks = False


@dataclass(eq=False)
class _Staging:
    """A CUDA engine's host-side copy of blocks in transit (CPU engines need none)."""

    block_ids: list[int]
    tensor: torch.Tensor


class TorchEngine(Engine, KvTransferEngine):
    def __init__(self, config: TorchConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = model_dir
        self.runner = ModelRunner(
            model_dir, device=config.device, dtype=config.dtype, num_threads=config.num_threads
        )
        self._bs = config.block_size
        self._max_len = config.max_model_len or 0  # known once the model's config is read
        self._vocab_size = 0
        self._cache: PagedKvCache | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._stepping: set[Seq] = set()  # in the step the compute thread runs now
        self._deferred_release: list[list[int]] = []  # blocks of sequences aborted mid-step
        self._sink: KvEventSink | None = None
        self._staged: dict[int, _Staging] = {}  # reservation id -> host copy (CUDA only)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead: str | None = "the engine is not started"
        # For tests and benchmarks: steps run, widest decode batch, tokens computed.
        self.steps = 0
        self.max_batch_rows = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0

    # -- Engine interface ------------------------------------------------------------

    async def start(self) -> None:
        if self._cache is not None:
            return
        loop = asyncio.get_running_loop()
        shape = await loop.run_in_executor(self._executor, self.runner.load)
        cfg = self.config
        max_len = cfg.max_model_len or shape.max_positions
        if not max_len:
            raise EngineConfigError(
                f"torch: {self.model_dir}/config.json has no max_position_embeddings; "
                "set max-model-len"
            )
        if shape.max_positions and max_len > shape.max_positions:
            raise EngineConfigError(
                f"torch: max-model-len {max_len} exceeds the model's max_position_embeddings "
                f"({shape.max_positions}) in {self.model_dir}/config.json"
            )
        self._max_len = max_len
        self._vocab_size = shape.vocab_size
        blocks = cfg.num_gpu_blocks or _DEFAULT_FULL_SEQS * -(-max_len // self._bs)
        self._cache = await loop.run_in_executor(
            self._executor, self.runner.allocate_cache, blocks, self._bs
        )
        for name, path in (cfg.lora_adapters or {}).items():
            await self.load_lora(str(name), str(path))
        self._dead = None
        log.info(
            "torch engine ready: %d KV blocks of %d tokens (%.1f MiB), max-model-len %d",
            blocks,
            self._bs,
            blocks * self._cache.bytes_per_block / 2**20,
            max_len,
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._dead = "the engine was stopped"
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._finish_all("abort")
        self._executor.shutdown(wait=False, cancel_futures=True)

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def lora_names(self) -> list[str]:
        return sorted(self.runner.adapters)

    async def load_lora(self, name: str, path: str) -> None:
        if not name or name in self.runner.adapters:
            raise EngineConfigError(f"torch: LoRA adapter name {name!r} is empty or taken")
        loop = asyncio.get_running_loop()
        # Reading the files and merging the weights happen on the compute thread.
        await loop.run_in_executor(self._executor, self.runner.add_lora, name, path)

    def cached_block_hashes(self) -> list[int]:
        return list(self._cache.pool.cached) if self._cache is not None else []

    def load_metrics(self) -> LoadMetrics:
        pool = self._cache.pool if self._cache is not None else None
        return LoadMetrics(
            active_blocks=pool.num_active if pool else 0,
            total_blocks=pool.num_blocks if pool else 0,
            active_requests=len(self._running),
            waiting_requests=len(self._waiting),
        )

    def prefix_hit_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens this engine's cache holds now (a worker's remote-prefill decision)."""
        if not self.config.enable_prefix_caching or self._cache is None:
            return 0
        cached = self._cache.pool.cached
        hits = 0
        for h in block_hashes(token_ids[: len(token_ids) - 1], self._bs):
            if h not in cached:
                break
            hits += 1
        return hits * self._bs

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        seq = self._new_seq(request)
        return self._stream(seq, self._enqueue)

    # -- disaggregation: KV computed here for another worker, or received from one ---------

    def kv_layout(self) -> KvLayout:
        shape = self.runner.shape
        if shape is None:
            raise EngineDeadError("torch engine: the engine is not started")
        size = torch.empty((), dtype=self.runner.dtype).element_size()
        return KvLayout(shape.num_layers, shape.num_kv_heads, shape.head_dim, size)

    def reserve_kv(self, request: EngineRequest) -> KvReservation | None:
        seq = self._new_seq(request)
        assert self._cache is not None
        pool, bs = self._cache.pool, self._bs
        num_tokens = len(seq.tokens) - 1  # the last prompt token is computed here
        hit: list[int] = []
        if self.config.enable_prefix_caching:
            hit = pool.acquire_prefix(seq.hashes[: num_tokens // bs])
        first = len(hit) * bs
        need = -(-num_tokens // bs) - len(hit)
        if first >= num_tokens or need > pool.num_available:
            pool.release(hit)
            return None
        seq.blocks = hit + [pool.allocate() for _ in range(need)]
        seq.num_computed = first
        seq.num_committed = len(hit)
        seq.cached_tokens = first
        seq.status = RESERVED
        self._emit_events()  # allocating may have evicted cached blocks
        return KvReservation(request, first, num_tokens, seq.blocks[len(hit) :], seq)

    def kv_transfer_limit(self, reservation: KvReservation) -> int:
        # Whole blocks move (the last one partly filled): the reserved blocks' bytes.
        assert self._cache is not None
        return len(reservation.block_ids) * self._cache.bytes_per_block

    def kv_buffers(self, reservation: KvReservation, sizes: list[int]) -> list[memoryview]:
        seq: Seq = reservation.state
        self._check_reserved(reservation)
        assert self._cache is not None
        per_block = self._cache.bytes_per_block
        blocks = reservation.block_ids
        if sizes != [per_block] * len(blocks):
            raise EngineRequestError(
                f"request {seq.request_id}: {len(sizes)} segments of {sorted(set(sizes))} bytes "
                f"arrived for {len(blocks)} blocks of {per_block}; prefill and decode workers "
                "must run the same model, dtype and block-size"
            )
        if self.runner.device.type == "cpu":
            return [_bytes_of(self._cache.tensor[b]) for b in blocks]
        # A GPU cache is filled from host memory in commit_kv.
        staging = torch.empty(
            (len(blocks), *self._cache.tensor.shape[1:]), dtype=self.runner.dtype, pin_memory=True
        )
        reservation_state = _Staging(list(blocks), staging)
        self._staged[id(reservation)] = reservation_state
        return [_bytes_of(staging[i]) for i in range(len(blocks))]

    def commit_kv(self, reservation: KvReservation) -> None:
        seq: Seq = reservation.state
        self._check_reserved(reservation)
        assert self._cache is not None
        staged = self._staged.pop(id(reservation), None)
        if staged is not None:
            index = torch.tensor(staged.block_ids, device=self.runner.device)
            self._cache.tensor[index] = staged.tensor.to(self.runner.device)
        seq.num_computed = reservation.num_tokens
        if self.config.enable_prefix_caching:
            # The received blocks are this worker's now: "stored", like a local prefill's.
            self._commit_blocks(seq, reservation.num_tokens // self._bs)
        reservation.committed = True
        self._emit_events()

    def generate_reserved(self, reservation: KvReservation) -> AsyncIterator[EngineOutput]:
        if not reservation.committed:
            raise EngineRequestError(
                f"request {reservation.request.request_id}: no KV was committed to decode from"
            )
        self._check_reserved(reservation)
        return self._stream(reservation.state, self._resume)

    def release_kv(self, reservation: KvReservation) -> None:
        seq: Seq = reservation.state
        self._staged.pop(id(reservation), None)
        if seq.status == RESERVED:
            self._release(seq)
            seq.status = DONE
            self._emit_events()
            self._wake.set()  # waiting sequences may fit now

    async def prefill_kv(
        self, request: EngineRequest, first_token: int, num_tokens: int
    ) -> PrefilledKv:
        # A real prefill through the scheduler, batched with this worker's other work; the
        # sequence keeps its blocks past its one sampled token until the transfer is done.
        prefill = prefill_only(request)
        seq = self._new_seq(prefill)
        seq.keep_blocks = True
        async for _ in self._stream(seq, self._enqueue):
            pass
        assert self._cache is not None
        if seq.num_computed < num_tokens:
            # The cache could not hold the prompt (it ended "length" before computing it).
            self._cache.pool.release(seq.blocks)
            seq.blocks = []
            raise PromptTooLongError(
                f"request {request.request_id}: this prefill worker's KV cache cannot hold "
                f"the prompt's {num_tokens} tokens"
            )
        bs = self._bs
        blocks = seq.blocks[first_token // bs : -(-num_tokens // bs)]
        if self.runner.device.type == "cpu":
            segments = [_bytes_of(self._cache.tensor[b]) for b in blocks]
        else:
            index = torch.tensor(blocks, device=self.runner.device)
            host = self._cache.tensor[index].to("cpu")
            segments = [_bytes_of(host[i]) for i in range(len(blocks))]
        held, seq.blocks = seq.blocks, []
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                assert self._cache is not None
                self._cache.pool.release(held)
                self._emit_events()
                self._wake.set()

        size = sum(len(s) for s in segments)
        return PrefilledKv(first_token, num_tokens, size, segments, release)

    def _check_reserved(self, reservation: KvReservation) -> None:
        if reservation.state.status != RESERVED:
            raise EngineRequestError(
                f"request {reservation.request.request_id}: the KV reservation was released"
            )

    def _resume(self, seq: Seq) -> None:
        if seq.status != RESERVED:
            raise EngineRequestError(f"request {seq.request_id}: the reservation was released")
        # Running at once: the next step computes the last prompt token (a one-token
        # prefill over the received KV) and samples the first output token from it.
        seq.status = RUNNING
        self._running.append(seq)
        self._ensure_started()
        self._wake.set()

    # -- submission and teardown -----------------------------------------------------

    def _new_seq(self, request: EngineRequest) -> Seq:
        if self._dead is not None:
            raise EngineDeadError(f"torch engine: {self._dead}")
        prompt = request.token_ids
        n = len(prompt)
        rid = request.request_id
        if n == 0:
            raise EngineRequestError(f"request {rid}: the prompt is empty")
        if n >= self._max_len:
            raise PromptTooLongError(
                f"request {rid}: the prompt has {n} tokens; this worker's max-model-len is "
                f"{self._max_len} (prompt plus at least one new token)"
            )
        assert self._cache is not None
        if -(-(n + 1) // self._bs) > self._cache.pool.num_blocks:
            raise PromptTooLongError(
                f"request {rid}: the prompt needs {-(-(n + 1) // self._bs)} KV blocks; this "
                f"worker has {self._cache.pool.num_blocks} (num-gpu-blocks)"
            )
        bad = next((t for t in prompt if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise EngineRequestError(
                f"request {rid}: token id {bad} is outside the model's vocabulary "
                f"(0..{self._vocab_size - 1})"
            )
        sp = request.sampling
        if sp.max_tokens < 1:
            raise EngineRequestError(
                f"request {rid}: max_tokens must be at least 1, got {sp.max_tokens}"
            )
        if request.lora_name is not None and request.lora_name not in self.runner.adapters:
            raise EngineRequestError(
                f"request {rid}: LoRA adapter {request.lora_name!r} is not loaded on this "
                f"worker (loaded: {', '.join(sorted(self.runner.adapters)) or 'none'})"
            )
        if sp.temperature < 0 or not 0 < sp.top_p <= 1:
            raise EngineRequestError(
                f"request {rid}: temperature must be >= 0 and top_p in (0, 1], got "
                f"{sp.temperature} and {sp.top_p}"
            )
        return Seq(request, self._max_len, self.config.seed, self._bs)

    def _enqueue(self, seq: Seq) -> None:
        self._waiting.append(seq)
        self._ensure_started()
        self._wake.set()

    async def _stream(self, seq: Seq, submit: Callable[[Seq], None]) -> AsyncIterator[EngineOutput]:
        submit(seq)
        loop = asyncio.get_running_loop()
        first = True
        try:
            while True:
                finish = seq.finish
                if seq.out or finish is not None:
                    if seq.error is not None:
                        raise ForwardError(f"torch engine: {seq.error}")
                    out, seq.out = seq.out, []
                    if first:
                        first = False
                        yield EngineOutput(out, finish, max(seq.cached_tokens, 0))
                    else:
                        yield EngineOutput(out, finish)
                    if finish is not None:
                        return
                    continue
                fut = seq.waiter = loop.create_future()
                await fut
        finally:
            if seq.status != DONE:
                self._abort(seq)

    def _ensure_started(self) -> None:
        if self._task is None and self._dead is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="torch-engine")

    def _release(self, seq: Seq) -> None:
        assert self._cache is not None
        if seq in self._stepping:
            # The compute thread may still write these blocks: free them after the step.
            self._deferred_release.append(seq.blocks)
        else:
            self._cache.pool.release(seq.blocks)
        seq.blocks = []

    def _abort(self, seq: Seq) -> None:
        """The consumer went away: forget the sequence and free its blocks now."""
        if seq.status == WAITING:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        elif seq.status == RUNNING:
            self._running.remove(seq)
            self._release(seq)
        elif seq.status == RESERVED:
            self._release(seq)
        seq.status = DONE
        if seq.finish is None:
            seq.finish = "abort"
        self._emit_events()

    def _finish(self, seq: Seq, reason: str, error: str | None = None) -> None:
        """End a sequence the scheduler owns; the caller removes it from ``_running``."""
        if not (seq.keep_blocks and error is None and reason in ("stop", "length")):
            self._release(seq)
        seq.status = DONE
        seq.finish = reason
        seq.error = error
        self._notify(seq)

    @staticmethod
    def _notify(seq: Seq) -> None:
        fut = seq.waiter
        if fut is not None:
            seq.waiter = None
            if not fut.done():
                fut.set_result(None)

    def _finish_all(self, reason: str, error: str | None = None) -> None:
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, reason, error)
        self._running.clear()
        self._waiting.clear()

    # -- the scheduler loop ----------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._running and not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                scheduled = self._schedule()
                self._emit_events()
                if not scheduled:
                    # Nothing fits now (blocks held by reservations): wait for a change.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batches = self._batches(scheduled)
                self._stepping = {seq for seq, _ in scheduled}
                try:
                    results = await loop.run_in_executor(
                        self._executor, self.runner.run, [rows for _, rows in batches]
                    )
                except Exception as exc:
                    log.exception("torch engine: forward pass failed")
                    self._end_step()
                    self._fail_step(scheduled, f"the forward pass failed: {exc}")
                    continue
                self._end_step()
                self._apply(batches, results)
                self._emit_events()
                self.steps += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("torch engine scheduler loop crashed; failing its requests")
            self._dead = "the scheduler loop crashed (see the log)"
            self._finish_all("abort", "the scheduler loop crashed")

    def _end_step(self) -> None:
        self._stepping = set()
        assert self._cache is not None
        for blocks in self._deferred_release:
            self._cache.pool.release(blocks)
        self._deferred_release.clear()

    def _fail_step(self, scheduled: list[tuple[Seq, int]], error: str) -> None:
        for seq, _ in scheduled:
            if seq.status == RUNNING:
                self._running.remove(seq)
                self._finish(seq, "abort", error)

    def _schedule(self) -> list[tuple[Seq, int]]:
        """Pick this step's work: ``[(seq, new_tokens)]``."""
        cfg = self.config
        bs = self._bs
        assert self._cache is not None
        pool = self._cache.pool
        running = self._running
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Seq, int]] = []

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = (seq.num_computed + n + bs - 1) // bs - len(seq.blocks)
            if need > 0:
                while need > pool.num_available and running[-1] is not seq:
                    self._preempt(running.pop())
                if need > pool.num_available:
                    # Alone and still out of blocks: the cache cannot hold this sequence.
                    running.pop()
                    self._finish(seq, "length")
                    continue
                for _ in range(need):
                    seq.blocks.append(pool.allocate())
            scheduled.append((seq, n))
            budget -= n
            i += 1

        waiting = self._waiting
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            seq = waiting[0]
            hit: list[int] = []
            if cfg.enable_prefix_caching and seq.num_computed == 0:
                # Leave at least one prompt token to compute: its logits pick the next token.
                hit = pool.acquire_prefix(seq.hashes[: (len(seq.tokens) - 1) // bs])
            computed = len(hit) * bs
            n = min(len(seq.tokens) - computed, budget)
            need = (computed + n + bs - 1) // bs - len(hit)
            if need > pool.num_available:
                pool.release(hit)
                break
            waiting.popleft()
            seq.blocks = hit
            for _ in range(need):
                hit.append(pool.allocate())
            seq.num_computed = computed
            seq.num_committed = computed // bs
            if seq.cached_tokens < 0:
                seq.cached_tokens = computed
            seq.status = RUNNING
            running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _preempt(self, seq: Seq) -> None:
        """Out of blocks: drop a running sequence's KV; it is recomputed when readmitted."""
        self._release(seq)
        seq.num_computed = 0
        seq.num_committed = 0
        seq.status = WAITING
        self._waiting.appendleft(seq)

    def _batches(
        self, scheduled: list[tuple[Seq, int]]
    ) -> list[tuple[list[tuple[Seq, int]], list[BatchRow]]]:
        """Group the step: all one-token decodes in one pass, each prompt chunk in its own."""
        decode: dict[str | None, list[tuple[Seq, int]]] = {}  # one pass per LoRA adapter
        batches: list[list[tuple[Seq, int]]] = []
        for seq, n in scheduled:
            if n == 1 and seq.generated:
                decode.setdefault(seq.lora, []).append((seq, n))
            else:
                batches.append([(seq, n)])
        for rows in decode.values():
            batches.append(rows)
            self.max_batch_rows = max(self.max_batch_rows, len(rows))
        out = []
        for items in batches:
            rows = [
                BatchRow(
                    token_ids=seq.tokens[seq.num_computed : seq.num_computed + n],
                    start=seq.num_computed,
                    block_ids=list(seq.blocks),
                    sample=seq.num_computed + n == len(seq.tokens),
                    temperature=seq.temperature,
                    top_p=seq.top_p,
                    generator=seq.generator,
                    adapter=seq.lora,
                )
                for seq, n in items
            ]
            out.append((items, rows))
        return out

    def _apply(
        self,
        batches: list[tuple[list[tuple[Seq, int]], list[BatchRow]]],
        results: list[list[int | None]],
    ) -> None:
        """The step's compute is done: record it, cache full blocks, append sampled tokens."""
        caching = self.config.enable_prefix_caching
        any_done = False
        for (items, _), sampled in zip(batches, results, strict=True):
            for (seq, n), token in zip(items, sampled, strict=True):
                if seq.status != RUNNING:
                    continue  # aborted or preempted while the step ran
                if seq.generated:
                    self.decode_tokens += n
                else:
                    self.prefill_tokens += n
                seq.num_computed += n
                if caching and seq.num_computed // self._bs > seq.num_committed:
                    self._commit_blocks(seq, seq.num_computed // self._bs)
                if token is None:
                    continue  # chunked prefill: more prompt next step
                seq.tokens.append(token)
                seq.out.append(token)
                seq.generated += 1
                if token in seq.stop_ids:
                    self._finish(seq, "stop")
                    any_done = True
                elif seq.generated >= seq.max_tokens or len(seq.tokens) >= seq.max_len:
                    self._finish(seq, "length")
                    any_done = True
                else:
                    self._notify(seq)
        if any_done:
            self._running = [s for s in self._running if s.status == RUNNING]

    def _commit_blocks(self, seq: Seq, full: int) -> None:
        """Offer the sequence's newly full blocks to the prefix cache (``stored`` events)."""
        assert self._cache is not None
        self._cache.pool.commit_sequence(seq, full, self._bs)

    def _emit_events(self) -> None:
        if self._cache is not None:
            self._cache.pool.flush_events(self._sink)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())
