"""A stand-in for the parts of vLLM the adapter uses, recording every call.

It mirrors vLLM's documented API (V1 engine): ``AsyncLLMEngine.from_engine_args``,
``generate(prompt, sampling_params, request_id)`` as an async generator of
``RequestOutput``s (deltas with ``RequestOutputKind.DELTA``), ``abort(request_id)``,
``shutdown()``; ``AsyncEngineArgs.add_cli_args``/``from_cli_args`` with a few of vLLM's
real flags declared as vLLM declares them (boolean-optional, store-true, JSON-valued);
``KVTransferConfig``/``KVEventsConfig``. With KV events enabled it publishes real ZMQ
messages in vLLM's wire format (``[topic, seq, msgpack EventBatch]``) to the configured
endpoint, with its own block hashes (SHA-256 bytes, as recent vLLM releases use).

``install(monkeypatch)`` puts it into ``sys.modules`` as ``vllm``.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import hashlib
import json
import sys
import types
from dataclasses import dataclass, fields
from typing import Any

import msgspec


class FlexibleArgumentParser(argparse.ArgumentParser):
    pass


@dataclass
class KVTransferConfig:
    kv_connector: str | None = None
    kv_role: str | None = None
    engine_id: str | None = None

    @classmethod
    def from_json(cls, text: str) -> KVTransferConfig:
        return cls(**json.loads(text))


@dataclass
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    topic: str = ""


@dataclass
class AsyncEngineArgs:
    model: str = ""
    block_size: int | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    distributed_executor_backend: str | None = None
    trust_remote_code: bool = False
    seed: int | None = None
    enable_lora: bool = False
    kv_transfer_config: KVTransferConfig | None = None
    kv_events_config: KVEventsConfig | None = None

    @staticmethod
    def add_cli_args(parser: FlexibleArgumentParser) -> FlexibleArgumentParser:
        parser.add_argument("--model", type=str)
        parser.add_argument("--block-size", type=int, choices=[8, 16, 32, 64, 128])
        parser.add_argument("--max-model-len", type=int)
        parser.add_argument("--max-num-batched-tokens", type=int)
        parser.add_argument("--max-num-seqs", type=int)
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
        parser.add_argument("--enforce-eager", action="store_true")
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        parser.add_argument("--distributed-executor-backend", choices=["ray", "mp", "uni"])
        parser.add_argument("--trust-remote-code", action="store_true")
        parser.add_argument("--seed", type=int)
        parser.add_argument("--enable-lora", action="store_true")
        parser.add_argument("--kv-transfer-config", type=KVTransferConfig.from_json)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> AsyncEngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None


def TokensPrompt(**kwargs: Any) -> dict[str, Any]:  # a TypedDict in vLLM
    return dict(kwargs)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass
class GenerateCall:
    prompt: dict[str, Any]
    sampling_params: SamplingParams
    request_id: str
    lora_request: LoRARequest | None = None
    yielded: int = 0
    closed_early: bool = False


class _HfConfig:
    def to_dict(self) -> dict[str, Any]:
        return {
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 32,
            "hidden_size": 256,
            "torch_dtype": "bfloat16",
        }


class FakeAsyncLLM:
    """Tokens: ``(prompt[-1] + 1 + i) % 1000``; one per output, a loop turn between them."""

    instances: list[FakeAsyncLLM] = []

    def __init__(self, engine_args: AsyncEngineArgs) -> None:
        self.engine_args = engine_args
        self.calls: list[GenerateCall] = []
        self.aborted: list[str] = []
        self.shut_down = False
        self.engine_id = f"fake-engine-{len(FakeAsyncLLM.instances)}"
        self.vllm_config = types.SimpleNamespace(
            cache_config=types.SimpleNamespace(num_gpu_blocks=1000)
        )
        self.model_config = types.SimpleNamespace(hf_config=_HfConfig())
        self._cached: dict[bytes, int] = {}  # this fake's prefix cache: hash -> refcount
        self._seq = 0
        self._pub: Any = None
        events = engine_args.kv_events_config
        if events is not None and events.enable_kv_cache_events:
            import zmq

            self._pub = zmq.Context.instance().socket(zmq.PUB)
            self._pub.connect(events.endpoint)  # an explicit host: vLLM connects, too
            self._topic = events.topic.encode()
        FakeAsyncLLM.instances.append(self)

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs) -> FakeAsyncLLM:
        return cls(engine_args)

    def publish(self, events: list[list[Any]]) -> None:
        if self._pub is None:
            return
        payload = msgspec.msgpack.encode([1.0, events, None])
        self._pub.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload])
        self._seq += 1

    def _store_prompt_blocks(self, tokens: list[int]) -> None:
        bs = self.engine_args.block_size or 16
        parent: bytes | None = None
        stored: list[bytes] = []
        first_parent: bytes | None = None
        for start in range(0, len(tokens) - len(tokens) % bs, bs):
            h = hashlib.sha256((parent or b"") + json.dumps(tokens[start : start + bs]).encode())
            digest = h.digest()
            if digest not in self._cached:
                if not stored:
                    first_parent = parent
                stored.append(digest)
                self._cached[digest] = start
            parent = digest
        if stored:
            begin = self._cached[stored[0]]
            block_tokens = tokens[begin : begin + bs * len(stored)]
            self.publish([["BlockStored", stored, first_parent, block_tokens, bs, None, "GPU"]])

    def evict_all(self) -> None:
        self._cached.clear()
        self.publish([["AllBlocksCleared"]])

    def evict(self, count: int) -> list[bytes]:
        gone = list(self._cached)[-count:]
        for h in gone:
            del self._cached[h]
        self.publish([["BlockRemoved", gone, "GPU"]])
        return gone

    async def generate(
        self,
        prompt: dict[str, Any],
        sampling_params: SamplingParams,
        request_id: str,
        *,
        lora_request: LoRARequest | None = None,
    ):
        call = GenerateCall(prompt, sampling_params, request_id, lora_request)
        self.calls.append(call)
        tokens = list(prompt["prompt_token_ids"])
        transfer = (sampling_params.extra_args or {}).get("kv_transfer_params") or {}
        self._store_prompt_blocks(tokens)
        stop = set(sampling_params.stop_token_ids or [])
        limit = sampling_params.max_tokens or 16
        try:
            for i in range(limit):
                await asyncio.sleep(0)
                token = (tokens[-1] + 1 + i) % 1000
                last = i == limit - 1 or token in stop
                reason = ("stop" if token in stop else "length") if last else None
                params = None
                # Without a KV connector vLLM ignores kv_transfer_params.
                connector = self.engine_args.kv_transfer_config is not None
                if last and connector and transfer.get("do_remote_decode"):
                    params = {
                        "do_remote_prefill": True,
                        "do_remote_decode": False,
                        "remote_engine_id": self.engine_id,
                        "remote_block_ids": list(range(len(tokens) // 16 + 1)),
                        "remote_host": "10.0.0.7",
                        "remote_port": 5600,
                    }
                call.yielded += 1
                yield RequestOutput(
                    request_id,
                    None,
                    tokens,
                    None,
                    [CompletionOutput(0, "", [token], None, None, reason)],
                    last,
                    num_cached_tokens=3 if i == 0 else None,
                    kv_transfer_params=params,
                )
                if last:
                    return
        except GeneratorExit:
            call.closed_early = True
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None


def install(monkeypatch: Any) -> types.ModuleType:
    """Make ``import vllm`` (and the submodules the adapter imports) this fake."""
    FakeAsyncLLM.instances = []
    root = types.ModuleType("vllm")
    root.__spec__ = types.SimpleNamespace(name="vllm", loader=None, submodule_search_locations=[])  # type: ignore[assignment]
    root.AsyncLLMEngine = FakeAsyncLLM  # type: ignore[attr-defined]
    root.AsyncEngineArgs = AsyncEngineArgs  # type: ignore[attr-defined]
    root.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    root.TokensPrompt = TokensPrompt  # type: ignore[attr-defined]
    config = types.ModuleType("vllm.config")
    config.KVTransferConfig = KVTransferConfig  # type: ignore[attr-defined]
    config.KVEventsConfig = KVEventsConfig  # type: ignore[attr-defined]
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = RequestOutputKind  # type: ignore[attr-defined]
    lora = types.ModuleType("vllm.lora")
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = LoRARequest  # type: ignore[attr-defined]
    utils = types.ModuleType("vllm.utils")
    argparse_utils = types.ModuleType("vllm.utils.argparse_utils")
    argparse_utils.FlexibleArgumentParser = FlexibleArgumentParser  # type: ignore[attr-defined]
    for name, module in {
        "vllm": root,
        "vllm.config": config,
        "vllm.sampling_params": sampling,
        "vllm.lora": lora,
        "vllm.lora.request": lora_request,
        "vllm.utils": utils,
        "vllm.utils.argparse_utils": argparse_utils,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return root
