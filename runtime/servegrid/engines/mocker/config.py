"""The mocker's settings, read from a graph config's dashed keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from servegrid.engines.base import EngineConfigError


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
    # Disaggregated serving: ship the KV's bytes for real (zero-filled, as many as the model's
    # layout says) over the bulk path, instead of only simulating the time they would take.
    kv_transfer_bytes: bool = False
    vocab_size: int | None = None  # default: the model directory's, else 2048
    model: str | None = None  # a model directory or the built-in model name

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MockerConfig:
        """Pick this engine's keys out of a service config; other keys are not ours."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            raw = config.get(key, config.get(f.name))
            if raw is None:
                continue
            values[f.name] = _coerce(key, raw, f.type)
        cfg = cls(**values)
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


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    kind = str(type_name)
    try:
        if kind.startswith("bool"):
            if isinstance(raw, str):
                if raw.lower() in ("true", "1", "yes", "on"):
                    return True
                if raw.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if kind.startswith("int"):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = kind.split(" ")[0]
        raise EngineConfigError(f"mocker: {key} must be {expected}, got {raw!r}") from None
