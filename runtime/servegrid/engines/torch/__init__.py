"""The torch engine: a Hugging Face causal LM (``transformers``) on CPU or CUDA.

``engine: torch`` in a graph config; needs ``pip install servegrid[torch]``. The model is a
local Hugging Face directory (``model:``); the built-in model name gets the tiny random
Llama that ``servegrid model init`` writes. Keys it reads (vLLM's names where vLLM has one):
``block-size``, ``num-gpu-blocks``, ``max-num-seqs``, ``max-num-batched-tokens``,
``max-model-len``, ``enable-prefix-caching``, ``device``, ``dtype``, ``seed``,
``num-threads``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servegrid.engines.torch.config import TorchConfig
from servegrid.engines.torch.engine import EngineDeadError, ForwardError, TorchEngine

__all__ = ["EngineDeadError", "ForwardError", "TorchConfig", "TorchEngine", "create"]


def create(config: Mapping[str, Any]) -> TorchEngine:
    """Build a torch engine from a service config (dashed keys; others are ignored)."""
    from servegrid.engines.base import EngineConfigError
    from servegrid.llm.model_init import ModelNotFoundError, ensure_model

    cfg = TorchConfig.from_config(config)
    assert cfg.model is not None  # checked by from_config
    try:
        model_dir = ensure_model(cfg.model, weights=True)
    except ModelNotFoundError as exc:
        raise EngineConfigError(f"torch: {exc}") from None
    return TorchEngine(cfg, model_dir)
