"""The mocker engine: a vLLM-like scheduler that runs no model.

One asyncio task per engine runs the scheduler loop. Each step it (1) keeps running
sequences going, preempting the newest ones (recompute later) when KV blocks run out,
(2) admits waiting sequences while ``max-num-seqs``, the ``max-num-batched-tokens`` budget
and free blocks allow, looking up their prompt's cached prefix first, (3) sleeps the step
time of the timing model, then (4) marks the scheduled tokens computed, caches blocks that
became full, and gives every sequence whose prompt is done one new token.

Generated ids are pseudo-random: the id at position ``p`` of the sequence is a hash of
(``seed``, or else the request id, and ``p``), drawn from the vocabulary minus the special
ids. So a run is reproducible, and a request continued elsewhere with prompt + the tokens
generated so far (a migrated stream) goes on with exactly the ids it would have produced.
EOS is never produced: a sequence ends with ``"length"`` at ``max_tokens`` (or at
``max-model-len``), or with ``"stop"`` if it draws one of the request's ``stop_token_ids``.

LoRA adapters are simulated: loading one takes ``lora-load-seconds`` (no weights are read),
and a request naming one draws its ids from a stream seeded by the adapter's name too, so an
adapter visibly changes the output, the same way on every worker; its KV blocks are hashed
with the adapter as salt, so they never match the base model's or another adapter's.

Outputs reach the consumer without a task per token: the loop appends ids to the
sequence's buffer and resolves the future the consumer waits on, if any.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from hashlib import blake2b

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
from servegrid.engines.lora import check_adapter
from servegrid.engines.mocker.config import MockerConfig
from servegrid.engines.mocker.kv_cache import BlockPool
from servegrid.engines.mocker.timing import step_seconds
from servegrid.llm.kv_hash import block_hashes

log = logging.getLogger(__name__)

_WAITING, _RUNNING, _DONE = 0, 1, 2
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_MIN_SLEEP_S = 0.001  # timers below the event loop's millisecond resolution only add jitter
_MAX_LAG_S = 0.01  # how far the simulated clock may trail real time before it forgets


class EngineDeadError(RuntimeError):
    """The scheduler loop stopped (the engine was stopped or crashed)."""


class _Seq:
    __slots__ = (
        "blocks",
        "cached_tokens",
        "finish",
        "generated",
        "hashes",
        "lora",
        "max_len",
        "max_tokens",
        "num_committed",
        "num_computed",
        "out",
        "rng",
        "status",
        "stop_ids",
        "tokens",
        "waiter",
    )

    def __init__(
        self,
        tokens: list[int],
        max_tokens: int,
        max_len: int,
        rng: int,
        stop_ids: frozenset[int],
        hashes: list[int],
        lora: str | None = None,
    ) -> None:
        self.tokens = tokens  # prompt + generated
        self.lora = lora  # the LoRA adapter it runs with: the salt of its block hashes
        self.max_tokens = max_tokens
        self.max_len = max_len
        self.rng = rng
        self.stop_ids = stop_ids
        self.hashes = hashes  # chained hashes of full blocks, grows as blocks fill
        self.blocks: list[int] = []
        self.num_computed = 0  # tokens whose KV is in ``blocks``
        self.num_committed = 0  # leading blocks already offered to the prefix cache
        self.generated = 0
        self.cached_tokens = -1  # unknown until first admitted
        self.status = _WAITING
        self.out: list[int] = []  # generated ids the consumer has not taken yet
        self.finish: str | None = None
        self.waiter: asyncio.Future[None] | None = None


class MockerEngine(Engine):
    def __init__(
        self,
        config: MockerConfig,
        *,
        vocab_size: int = 2048,
        special_ids: frozenset[int] = frozenset(),
        lora_adapters: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._lora_config = dict(lora_adapters or {})  # loaded by ``start``
        self._loras: dict[str, str] = {}  # adapter name -> path, once loaded
        self._bs = config.block_size
        self._pool = BlockPool(config.num_gpu_blocks)
        self._allowed = [i for i in range(vocab_size) if i not in special_ids]
        if not self._allowed:
            raise EngineRequestError("mocker: the vocabulary has no non-special token ids")
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._sink: KvEventSink | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead: str | None = None
        # For tests and benchmarks: steps run, and the widest step seen.
        self.steps = 0
        self.max_step_seqs = 0
        self.max_step_tokens = 0

    # -- Engine interface ------------------------------------------------------------

    async def start(self) -> None:
        self._ensure_started()
        for name, path in self._lora_config.items():
            await self.load_lora(name, path)

    def lora_names(self) -> list[str]:
        return sorted(self._loras)

    async def load_lora(self, name: str, path: str) -> None:
        """Simulate loading an adapter: it takes ``lora-load-seconds`` and reads nothing.
        Loading a name again from the same path is a no-op; from another path, an error."""
        check_adapter(name, path, "mocker")
        loaded = self._loras.get(name)
        if loaded is not None:
            if loaded == path:
                return
            raise EngineConfigError(
                f"mocker: LoRA adapter {name!r} is already loaded from {loaded}; "
                f"choose another name for {path}"
            )
        cfg = self.config
        await asyncio.sleep(cfg.lora_load_seconds / cfg.speedup_ratio)
        self._loras.setdefault(name, path)

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

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(
            active_blocks=self._pool.num_active,
            total_blocks=self._pool.num_blocks,
            active_requests=len(self._running),
            waiting_requests=len(self._waiting),
        )

    def cached_block_hashes(self) -> list[int]:
        return list(self._pool.cached)

    def prefix_hit_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens this engine's cache holds now (a worker's remote-prefill decision)."""
        if not self.config.enable_prefix_caching:
            return 0
        cached = self._pool.cached
        hits = 0
        for h in block_hashes(token_ids[: len(token_ids) - 1], self._bs):
            if h not in cached:
                break
            hits += 1
        return hits * self._bs

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._stream(lambda: self._submit(request))

    async def _stream(self, start: Callable[[], _Seq]) -> AsyncIterator[EngineOutput]:
        """Outputs of the sequence ``start()`` puts in the scheduler's hands (called on the
        first iteration, so an iterator closed before it starts leaves nothing behind)."""
        seq = start()
        loop = asyncio.get_running_loop()
        first = True
        try:
            while True:
                finish = seq.finish
                if seq.out or finish is not None:
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
            if seq.status != _DONE:
                self._abort(seq)

    # -- submission and teardown -----------------------------------------------------

    def _submit(self, request: EngineRequest) -> _Seq:
        seq = self._new_seq(request)
        self._ensure_started()
        self._waiting.append(seq)
        self._wake.set()
        return seq

    def _new_seq(self, request: EngineRequest) -> _Seq:
        """A checked, unscheduled sequence for ``request``."""
        if self._dead is not None:
            raise EngineDeadError(f"mocker: {self._dead}")
        cfg = self.config
        prompt = list(request.token_ids)
        n = len(prompt)
        if n == 0:
            raise EngineRequestError(f"request {request.request_id}: the prompt is empty")
        if n >= cfg.max_model_len:
            raise PromptTooLongError(
                f"request {request.request_id}: the prompt has {n} tokens; this worker's "
                f"max-model-len is {cfg.max_model_len} (prompt plus at least one new token)"
            )
        if -(-(n + 1) // self._bs) > self._pool.num_blocks:
            raise PromptTooLongError(
                f"request {request.request_id}: the prompt needs {-(-(n + 1) // self._bs)} "
                f"KV blocks; this worker has {self._pool.num_blocks} (num-gpu-blocks)"
            )
        sp = request.sampling
        if sp.max_tokens < 1:
            raise EngineRequestError(
                f"request {request.request_id}: max_tokens must be at least 1, got {sp.max_tokens}"
            )
        lora = request.lora_name
        if lora is not None and lora not in self._loras:
            raise EngineRequestError(
                f"request {request.request_id}: LoRA adapter {lora!r} is not loaded on this "
                f"worker (loaded: {', '.join(self.lora_names()) or 'none'})"
            )
        if sp.seed is not None:
            rng = sp.seed & _MASK64
        else:
            digest = blake2b(request.request_id.encode(), digest_size=8).digest()
            rng = int.from_bytes(digest, "little")
        if lora is not None:  # the adapter's own stream: it changes the output
            rng ^= int.from_bytes(blake2b(lora.encode(), digest_size=8).digest(), "little")
        hashes = block_hashes(prompt, self._bs, salt=lora) if cfg.enable_prefix_caching else []
        return _Seq(
            prompt,
            sp.max_tokens,
            cfg.max_model_len,
            rng,
            frozenset(sp.stop_token_ids),
            hashes,
            lora,
        )

    def _ensure_started(self) -> None:
        if self._task is None and self._dead is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mocker-loop")

    def _abort(self, seq: _Seq) -> None:
        """The consumer went away: forget the sequence and free its blocks now."""
        if seq.status == _WAITING:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        elif seq.status == _RUNNING:
            self._running.remove(seq)
        if seq.blocks:  # running, or holding blocks reserved for KV computed elsewhere
            self._pool.release(seq.blocks)
            seq.blocks = []
        seq.status = _DONE
        if seq.finish is None:
            seq.finish = "abort"

    def _finish(self, seq: _Seq, reason: str) -> None:
        """End a sequence the scheduler owns; the caller removes it from ``_running``."""
        self._pool.release(seq.blocks)
        seq.blocks = []
        seq.status = _DONE
        seq.finish = reason
        fut = seq.waiter
        if fut is not None:
            seq.waiter = None
            if not fut.done():
                fut.set_result(None)

    def _finish_all(self, reason: str) -> None:
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, reason)
        self._running.clear()
        self._waiting.clear()

    # -- the scheduler loop ----------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        clock = loop.time()
        try:
            while True:
                if not self._running and not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                    clock = loop.time()
                scheduled, prefill, decode, context = self._schedule()
                self._emit_events()
                dt = step_seconds(prefill, decode, context, self.config.speedup_ratio)
                # A simulated clock: steps shorter than the loop's timer resolution run
                # back to back and the time they owe is slept off once it adds up.
                now = loop.time()
                clock = max(clock, now - _MAX_LAG_S) + dt
                delay = clock - now
                await asyncio.sleep(delay if delay >= _MIN_SLEEP_S else 0)
                self._apply(scheduled)
                self._emit_events()
                self.steps += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("mocker scheduler loop crashed; failing its requests")
            self._dead = "the scheduler loop crashed (see the log)"
            self._finish_all("abort")

    def _schedule(self) -> tuple[list[tuple[_Seq, int]], int, int, int]:
        """Pick this step's work: ``[(seq, new_tokens)]`` and the timing model's inputs."""
        cfg = self.config
        bs = self._bs
        pool = self._pool
        running = self._running
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        prefill = decode = context = 0

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
                blocks = seq.blocks
                for _ in range(need):
                    blocks.append(pool.allocate())
            scheduled.append((seq, n))
            budget -= n
            context += seq.num_computed
            if n == 1 and seq.generated:
                decode += 1
            else:
                prefill += n
            i += 1

        waiting = self._waiting
        caching = cfg.enable_prefix_caching
        chunked = cfg.enable_chunked_prefill
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            seq = waiting[0]
            hit: list[int] = []
            if caching and seq.num_computed == 0:
                # Leave at least one prompt token to compute, as vLLM does.
                hit = pool.acquire_prefix(seq.hashes[: (len(seq.tokens) - 1) // bs])
            computed = len(hit) * bs
            remaining = len(seq.tokens) - computed
            if remaining > budget and not chunked:
                pool.release(hit)
                break
            n = min(remaining, budget)
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
            seq.status = _RUNNING
            running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            context += computed
            prefill += n
        used = cfg.max_num_batched_tokens - budget
        if used > self.max_step_tokens:
            self.max_step_tokens = used
        if len(scheduled) > self.max_step_seqs:
            self.max_step_seqs = len(scheduled)
        return scheduled, prefill, decode, context

    def _preempt(self, seq: _Seq) -> None:
        """Out of blocks: drop a running sequence's KV; it is recomputed when readmitted."""
        self._pool.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_committed = 0
        seq.status = _WAITING
        self._waiting.appendleft(seq)

    def _apply(self, scheduled: list[tuple[_Seq, int]]) -> None:
        """The step's compute is done: record it and sample one token per finished prefill."""
        bs = self._bs
        pool = self._pool
        caching = self.config.enable_prefix_caching
        allowed = self._allowed
        n_allowed = len(allowed)
        any_done = False
        for seq, n in scheduled:
            if seq.status != _RUNNING:
                continue  # aborted or preempted while the step ran
            computed = seq.num_computed + n
            seq.num_computed = computed
            tokens = seq.tokens
            if caching and computed // bs > seq.num_committed:
                pool.commit_sequence(seq, computed // bs, bs)
            if computed < len(tokens):
                continue  # chunked prefill: more prompt next step
            # splitmix64 of (seed, position): the id depends on nothing a migration changes
            z = (seq.rng + len(tokens) * _GOLDEN) & _MASK64
            z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
            z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
            token = allowed[((z ^ (z >> 31)) >> 11) % n_allowed]
            tokens.append(token)
            seq.out.append(token)
            seq.generated += 1
            if token in seq.stop_ids:
                self._finish(seq, "stop")
                any_done = True
            elif seq.generated >= seq.max_tokens or len(tokens) >= seq.max_len:
                self._finish(seq, "length")
                any_done = True
            else:
                fut = seq.waiter
                if fut is not None:
                    seq.waiter = None
                    if not fut.done():
                        fut.set_result(None)
        if any_done:
            self._running = [s for s in self._running if s.status == _RUNNING]

    def _emit_events(self) -> None:
        self._pool.flush_events(self._sink)
