"""The vllm engine: vLLM's async engine (``AsyncLLM``) behind servegrid's Engine interface.

``engine: vllm`` in a graph config; needs ``pip install 'servegrid[vllm]'`` and CUDA GPUs.
Every key of the worker's config that is a ``vllm serve`` flag reaches vLLM (``args``);
KV events flow to the router (``kv_events``); disaggregation uses vLLM's KV connector
(``engine``). Importing this package does not import vLLM: ``start`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servegrid.engines.vllm.engine import VllmEngine, model_for_vllm

__all__ = ["VllmEngine", "create"]


def create(config: Mapping[str, Any]) -> VllmEngine:
    """Build (not start) a vLLM engine from a service config (dashed keys)."""
    from servegrid.engines.base import EngineConfigError
    from servegrid.engines.vllm.api import vllm_installed
    from servegrid.llm.model_init import ModelNotFoundError

    if not vllm_installed():
        raise EngineConfigError(
            "vllm: vLLM is not installed here (pip install 'servegrid[vllm]' on a CUDA host); "
            "use engine: torch or engine: mocker without a GPU"
        )
    model = config.get("model")
    if not model:
        raise EngineConfigError("vllm: no model; set `model:` to a Hugging Face id or directory")
    try:
        resolved = model_for_vllm(str(model))
    except ModelNotFoundError as exc:
        raise EngineConfigError(f"vllm: {exc}") from None
    return VllmEngine(config, resolved)
