"""The mocker's settings, read from a graph config's dashed keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servegrid.engines.base import EngineConfigError
from servegrid.engines.settings import read_settings


@dataclass(frozen=True, slots=True)
class MockerConfig:
    block_size: int = 16
    num_gpu_blocks: int = 8192
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    speedup_ratio: float = 1.0
    lora_load_seconds: float = 0.2  # simulated time to load a LoRA adapter (÷ speedup-ratio)
    # Disaggregated serving: ship the KV's bytes for real (zero-filled, as many as the model's
    # layout says) over the bulk path, instead of only simulating the time they would take.
    kv_transfer_bytes: bool = False
    vocab_size: int | None = None  # default: the model directory's, else 2048
    model: str | None = None  # a model directory or the built-in model name

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MockerConfig:
        """Pick this engine's keys out of a service config; other keys are not ours."""
        cfg = read_settings(cls, config, "mocker")
        cfg._check()
        return cfg

    def _check(self) -> None:
        for key in (
            "block_size",
            "num_gpu_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            if getattr(self, key) <= 0:
                raise EngineConfigError(
                    f"mocker: {key.replace('_', '-')} must be positive, got {getattr(self, key)}"
                )
        if self.lora_load_seconds < 0:
            raise EngineConfigError(
                f"mocker: lora-load-seconds must be >= 0, got {self.lora_load_seconds}"
            )
        if self.speedup_ratio <= 0:
            raise EngineConfigError(
                f"mocker: speedup-ratio must be positive, got {self.speedup_ratio}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise EngineConfigError(
                "mocker: without chunked prefill max-num-batched-tokens "
                f"({self.max_num_batched_tokens}) must be at least max-model-len "
                f"({self.max_model_len}), or a long prompt could never be scheduled"
            )
