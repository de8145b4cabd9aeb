"""The vLLM engine adapter: servegrid's Engine interface over vLLM's ``AsyncLLM``.

Generation: the processor's token ids go in as a ``TokensPrompt``, sampling as
``SamplingParams`` with ``output_kind=DELTA`` (each ``RequestOutput`` carries only the new
tokens) and ``detokenize=False`` (the processor detokenizes), so outputs map one to one onto
``EngineOutput``. Closing the stream early (the client went away) closes vLLM's generator
and calls ``abort(request_id)``, which frees the request's blocks in vLLM's scheduler.

KV events: vLLM publishes them over ZMQ to a loopback socket of this worker
(``kv_events``), translated to servegrid's block hashes and handed to the Worker's sink.

Disaggregation goes through vLLM's KV connector (NixlConnector by default), following the
protocol of vLLM's disaggregated-serving proxies: the prefill side runs the prompt with
``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": True, ...}``; vLLM keeps the
blocks and returns, in its final ``RequestOutput.kv_transfer_params``, where they are
(engine id, block ids, host, port); the decode side passes those parameters with the request
and vLLM pulls the KV over NIXL (RDMA where the fabric has it) before decoding. So on
servegrid's bulk path (``engines.disagg``) this engine ships those parameters (a small JSON
document), not tensors; the tensors move GPU to GPU inside vLLM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from servegrid.engines.base import (
    Engine,
    EngineConfigError,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    KvEventSink,
    LoadMetrics,
    SamplingParams,
)
from servegrid.engines.disagg import KvLayout, KvReservation, KvTransferEngine, PrefilledKv
from servegrid.engines.vllm.api import VllmApi, load_vllm_api
from servegrid.engines.vllm.args import KV_EVENTS_TOPIC, EngineArgsPlan, build_engine_args
from servegrid.engines.vllm.kv_events import VllmKvEventTranslator, ZmqKvEventSubscriber
from servegrid.llm.kv_hash import block_hashes

log = logging.getLogger(__name__)

# What a prefill request tells vLLM's connector: keep the KV for a remote decode.
PREFILL_KV_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


class KvTransferParamsMissingError(EngineRequestError):
    """vLLM returned no kv_transfer_params for a prefill: no KV connector is configured."""


@dataclass(eq=False)
class _RemoteKv:
    """A decode-side reservation: vLLM holds nothing until the decode request arrives."""

    descriptor: bytearray | None = None
    params: dict[str, Any] | None = None


class VllmEngine(Engine, KvTransferEngine):
    def __init__(
        self,
        settings: Mapping[str, Any],
        model: str,
        *,
        api: VllmApi | None = None,
        kv_events_port: int | None = None,
    ) -> None:
        self.settings = dict(settings)
        self.model = model
        self._api = api
        self._kv_events_port = kv_events_port
        self.block_size = int(self.settings.get("block-size") or 16)
        self.max_model_len = self.settings.get("max-model-len")
        self.disaggregated = bool(self.settings.get("remote-prefill"))
        self.plan: EngineArgsPlan | None = None
        self.llm: Any = None
        self.translator = VllmKvEventTranslator()
        self._subscriber: ZmqKvEventSubscriber | None = None
        self._active: set[str] = set()
        # LoRA adapters: name -> (vLLM's int id, path); vLLM loads one on first use.
        self._loras: dict[str, tuple[int, str]] = {}
        for name, path in dict(self.settings.get("lora-adapters") or {}).items():
            self._loras[str(name)] = (len(self._loras) + 1, str(path))

    # -- Engine interface ------------------------------------------------------------

    async def start(self) -> None:
        if self.llm is not None:
            return
        api = self._api or load_vllm_api()
        self._api = api
        port = self._kv_events_port
        if port is None:
            from servegrid.distributed.embedded_nats import free_port

            port = free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        self.plan = build_engine_args(
            api,
            self.settings,
            self.model,
            kv_events_endpoint=endpoint,
            disaggregated=self.disaggregated,
        )
        if self.plan.ignored_keys:
            log.info(
                "vllm: config keys that are not vLLM engine arguments (servegrid's own): %s",
                ", ".join(sorted(self.plan.ignored_keys)),
            )
        if self.settings.get("kv-events-config") is None:
            # Subscribe before the engine exists, so no early event is missed.
            self._subscriber = ZmqKvEventSubscriber(endpoint, KV_EVENTS_TOPIC, self.translator)
            await self._subscriber.start()
        log.info("vllm: starting AsyncLLM with %s", " ".join(self.plan.argv))
        self.llm = api.AsyncLLMEngine.from_engine_args(self.plan.engine_args)

    async def stop(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.stop()
            self._subscriber = None
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self.translator.sink = sink

    def cached_block_hashes(self) -> list[int]:
        return self.translator.hashes()

    def lora_names(self) -> list[str]:
        return sorted(self._loras)

    async def load_lora(self, name: str, path: str) -> None:
        if not name or name in self._loras:
            raise EngineConfigError(f"vllm: LoRA adapter name {name!r} is empty or taken")
        if self.plan is not None and not getattr(self.plan.engine_args, "enable_lora", False):
            raise EngineConfigError(
                "vllm: this engine was started without --enable-lora; set lora-adapters (or "
                "enable-lora: true) in the worker's config to load adapters at run time"
            )
        self._loras[name] = (len(self._loras) + 1, path)

    def load_metrics(self) -> LoadMetrics:
        cache_config = getattr(getattr(self.llm, "vllm_config", None), "cache_config", None)
        total = getattr(cache_config, "num_gpu_blocks", None) or 0
        return LoadMetrics(
            active_blocks=len(self.translator.hashes()),
            total_blocks=int(total),
            active_requests=len(self._active),
            waiting_requests=0,
        )

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self._check(request)
        return self._stream(request, request.sampling.max_tokens, None)

    # -- disaggregation through vLLM's KV connector -------------------------------------

    def kv_layout(self) -> KvLayout:
        hf_config = self.llm.model_config.hf_config
        return KvLayout.from_model_config(hf_config.to_dict(), f"{self.model} config")

    def prefix_hit_tokens(self, token_ids: list[int]) -> int:
        cached = set(self.translator.hashes())
        hits = 0
        for h in block_hashes(token_ids[: len(token_ids) - 1], self.block_size):
            if h not in cached:
                break
            hits += 1
        return hits * self.block_size

    def reserve_kv(self, request: EngineRequest) -> KvReservation | None:
        self._check(request)
        # vLLM's decode allocates blocks itself when the request arrives with the prefill's
        # kv_transfer_params, and pulls only what its own prefix cache lacks.
        return KvReservation(request, 0, len(request.token_ids) - 1, [], _RemoteKv())

    def kv_buffers(self, reservation: KvReservation, sizes: list[int]) -> list[memoryview]:
        if len(sizes) != 1:
            raise EngineRequestError(
                f"request {reservation.request.request_id}: a vLLM prefill sends one "
                f"kv_transfer_params document, {len(sizes)} segments arrived"
            )
        remote: _RemoteKv = reservation.state
        remote.descriptor = bytearray(sizes[0])
        return [memoryview(remote.descriptor)]

    def commit_kv(self, reservation: KvReservation) -> None:
        remote: _RemoteKv = reservation.state
        if remote.descriptor is None:
            raise EngineRequestError(
                f"request {reservation.request.request_id}: no kv_transfer_params arrived"
            )
        remote.params = msgspec.json.decode(bytes(remote.descriptor))
        reservation.committed = True

    def generate_reserved(self, reservation: KvReservation) -> AsyncIterator[EngineOutput]:
        remote: _RemoteKv = reservation.state
        if not reservation.committed or remote.params is None:
            raise EngineRequestError(
                f"request {reservation.request.request_id}: no kv_transfer_params to decode from"
            )
        request = reservation.request
        return self._stream(request, request.sampling.max_tokens, remote.params)

    def release_kv(self, reservation: KvReservation) -> None:
        # Nothing is held on the decode side; the prefill side's vLLM frees the blocks it
        # kept once they are pulled, or after its own timeout when they never are.
        return None

    async def prefill_kv(
        self, request: EngineRequest, first_token: int, num_tokens: int
    ) -> PrefilledKv:
        self._check(request)
        params: dict[str, Any] | None = None
        async for output in self._outputs(request, 1, dict(PREFILL_KV_TRANSFER_PARAMS)):
            params = getattr(output, "kv_transfer_params", None) or params
        if not params:
            raise KvTransferParamsMissingError(
                f"request {request.request_id}: vLLM returned no kv_transfer_params; the "
                "prefill worker's vLLM needs a KV connector (set kv-connector, or vLLM's "
                "kv-transfer-config)"
            )
        document = msgspec.json.encode(params)
        return PrefilledKv(first_token, num_tokens, 0, [memoryview(document)])

    # -- requests --------------------------------------------------------------------

    def _check(self, request: EngineRequest) -> None:
        if self.llm is None:
            raise EngineConfigError("vllm: the engine is not started")
        if not request.token_ids:
            raise EngineRequestError(f"request {request.request_id}: the prompt is empty")
        if request.sampling.max_tokens < 1:
            raise EngineRequestError(
                f"request {request.request_id}: max_tokens must be at least 1, got "
                f"{request.sampling.max_tokens}"
            )
        if request.lora_name is not None and request.lora_name not in self._loras:
            raise EngineRequestError(
                f"request {request.request_id}: LoRA adapter {request.lora_name!r} is not "
                f"loaded on this worker (loaded: {', '.join(self.lora_names()) or 'none'})"
            )

    def sampling_params(
        self, sampling: SamplingParams, max_tokens: int, kv_transfer_params: dict | None
    ) -> Any:
        api = self._api
        assert api is not None
        extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
        return api.SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            detokenize=False,
            output_kind=api.RequestOutputKind.DELTA,
            extra_args=extra,
        )

    async def _outputs(
        self, request: EngineRequest, max_tokens: int, kv_transfer_params: dict | None
    ) -> AsyncIterator[Any]:
        """vLLM's ``RequestOutput``s for ``request``; aborts it in vLLM if closed early."""
        api = self._api
        assert api is not None
        rid = request.request_id
        params = self.sampling_params(request.sampling, max_tokens, kv_transfer_params)
        prompt = api.TokensPrompt(prompt_token_ids=list(request.token_ids))
        lora = None
        if request.lora_name is not None:
            lora_id, lora_path = self._loras[request.lora_name]
            lora = api.LoRARequest(request.lora_name, lora_id, lora_path)
        stream = self.llm.generate(prompt, params, rid, lora_request=lora)
        finished = False
        self._active.add(rid)
        try:
            async for output in stream:
                finished = bool(output.finished)
                yield output
                if finished:
                    return
        finally:
            self._active.discard(rid)
            if not finished:
                await stream.aclose()
                # vLLM aborts on its generator's close too; the explicit call makes sure
                # the scheduler frees the blocks even if the generator never started.
                await asyncio.shield(self.llm.abort(rid))

    async def _stream(
        self, request: EngineRequest, max_tokens: int, kv_transfer_params: dict | None
    ) -> AsyncIterator[EngineOutput]:
        first = True
        outputs = self._outputs(request, max_tokens, kv_transfer_params)
        try:
            async for output in outputs:
                completion = output.outputs[0]
                finish = None
                if output.finished:
                    finish = _FINISH_REASONS.get(str(completion.finish_reason), "stop")
                tokens = list(completion.token_ids)
                if first:
                    first = False
                    cached = int(getattr(output, "num_cached_tokens", 0) or 0)
                    yield EngineOutput(tokens, finish, cached)
                else:
                    yield EngineOutput(tokens, finish)
        finally:
            await outputs.aclose()


def model_for_vllm(value: str) -> str:
    """A local model directory (the built-in model built if named), else a hub id as given."""
    from servegrid.llm.model_init import BUILTIN_MODEL, ensure_model

    if value == BUILTIN_MODEL or Path(value).expanduser().is_dir():
        return str(ensure_model(value, weights=True))
    return value
