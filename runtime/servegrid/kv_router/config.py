"""The KV router's settings: graph config keys of ``Router`` (or of ``Processor`` when the graph
has no Router), each with its default, defined here once.

- ``block-size`` (16): tokens per KV block; must equal the workers'.
- ``overlap-score-weight`` (1.0): weight of the blocks a worker would have to prefill,
  against its active blocks.
- ``router-temperature`` (0.0): 0, the lowest cost wins (ties at random); above 0, the
  worker is sampled from a softmax over the normalised costs.
- ``use-kv-events`` (true): index the workers' KV events; false, predict each worker's cache
  from this router's own decisions (for engines that publish no events).
- ``router-ttl`` (120.0): seconds a routed prompt counts as cached on its worker when
  predicting (``use-kv-events: false``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servegrid.sdk.errors import ConfigError


class KvRouterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    block_size: int = Field(16, gt=0)
    overlap_score_weight: float = Field(1.0, ge=0)
    router_temperature: float = Field(0.0, ge=0)
    use_kv_events: bool = True
    router_ttl: float = Field(120.0, gt=0)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], where: str) -> KvRouterConfig:
        """Pick the router's keys out of a service's config section (dashed keys)."""
        names = set(cls.model_fields)
        values = {
            key.replace("-", "_"): value
            for key, value in settings.items()
            if key.replace("-", "_") in names
        }
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                for e in exc.errors()
            )
            raise ConfigError(f"{where}: bad KV router setting ({problems})") from None
