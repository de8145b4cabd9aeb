"""The torch engine's settings, read from a graph config's dashed keys (vLLM's names)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servegrid.engines.base import EngineConfigError
from servegrid.engines.settings import read_settings

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class TorchConfig:
    model: str | None = None  # a local Hugging Face directory, or the built-in model name
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto": the model's torch_dtype on CUDA, float32 on CPU
    block_size: int = 16
    # KV blocks in the paged cache; unset: room for four sequences of max-model-len.
    num_gpu_blocks: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # unset: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds sampling of requests that bring no seed of their own
    # CPU threads torch uses in a forward pass; 0 leaves torch's default (one per core).
    # One by default: the workers of a graph share the host's cores, and torch's OpenMP
    # threads spin-wait when they outnumber the free cores (on the loaded 2-core test
    # machine a tiny-model decode step took 62 ms with 2 threads, 2.5 ms with 1).
    num_threads: int = 1
    # LoRA adapters to load at start, name -> PEFT directory; more via ``load_lora``.
    lora_adapters: dict[str, str] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TorchConfig:
        cfg = read_settings(cls, config, "torch")
        cfg._check()
        return cfg

    def _check(self) -> None:
        for key in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, key) <= 0:
                raise EngineConfigError(
                    f"torch: {key.replace('_', '-')} must be positive, got {getattr(self, key)}"
                )
        for key in ("num_gpu_blocks", "max_model_len"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise EngineConfigError(
                    f"torch: {key.replace('_', '-')} must be positive, got {value}"
                )
        if self.dtype not in DTYPES:
            raise EngineConfigError(
                f"torch: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.num_threads < 0:
            raise EngineConfigError(
                f"torch: num-threads must not be negative, got {self.num_threads}"
            )
        if not self.model:
            raise EngineConfigError(
                "torch: no model; set `model:` to a local Hugging Face model directory "
                "(`servegrid model init DIR` makes a tiny one)"
            )
