"""Every vLLM name the adapter uses, imported in one place.

A reader checking the adapter against vLLM's documentation starts here; the test suite
replaces this module's source (``vllm``) with a fake that records calls. Paths are those of
vLLM's V1 engine (0.10 and later), where ``vllm.AsyncLLMEngine`` is
``vllm.v1.engine.async_llm.AsyncLLM``:

- ``AsyncLLMEngine.from_engine_args(AsyncEngineArgs)``; ``generate(prompt, sampling_params,
  request_id)`` is an async generator of ``RequestOutput``; ``abort(request_id)``;
  ``shutdown()``.
- ``AsyncEngineArgs.add_cli_args(parser)`` and ``AsyncEngineArgs.from_cli_args(namespace)``
  on a ``FlexibleArgumentParser``: the route ``vllm serve`` takes from flags to engine args.
- ``SamplingParams(n, max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos,
  detokenize, output_kind, extra_args)``; ``RequestOutputKind.DELTA`` streams new tokens only.
- ``TokensPrompt(prompt_token_ids=...)``: the prompt is already tokenized by the processor.
- ``KVTransferConfig(kv_connector, kv_role)`` and ``KVEventsConfig(enable_kv_cache_events,
  publisher, endpoint, topic)`` from ``vllm.config``.
- ``LoRARequest(lora_name, lora_int_id, lora_path)`` from ``vllm.lora.request``, passed as
  ``generate(..., lora_request=...)``; the engine needs ``--enable-lora``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from servegrid.engines.base import EngineConfigError


@dataclass(frozen=True)
class VllmApi:
    AsyncLLMEngine: Any
    AsyncEngineArgs: Any
    SamplingParams: Any
    RequestOutputKind: Any
    TokensPrompt: Any
    KVTransferConfig: Any
    KVEventsConfig: Any
    FlexibleArgumentParser: Any
    LoRARequest: Any


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def load_vllm_api() -> VllmApi:
    """Import vLLM (slow: it imports torch and CUDA libraries)."""
    if not vllm_installed():
        raise EngineConfigError(
            "vllm: vLLM is not installed here (pip install 'servegrid[vllm]' on a CUDA host); "
            "use engine: torch or engine: mocker without a GPU"
        )
    import vllm
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before 0.11 kept it in vllm.utils
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]

    return VllmApi(
        AsyncLLMEngine=vllm.AsyncLLMEngine,
        AsyncEngineArgs=vllm.AsyncEngineArgs,
        SamplingParams=vllm.SamplingParams,
        RequestOutputKind=RequestOutputKind,
        TokensPrompt=vllm.TokensPrompt,
        KVTransferConfig=KVTransferConfig,
        KVEventsConfig=KVEventsConfig,
        FlexibleArgumentParser=FlexibleArgumentParser,
        LoRARequest=LoRARequest,
    )
