"""The KV router's settings: graph config keys of ``Router`` (or of ``Processor`` when the graph
has no Router), each with its default, defined here once.

- ``block-size`` (16): tokens per KV block; must equal the workers'.
- ``overlap-score-weight`` (4.0): blocks of load one block of prefill is worth: the weight
  of the blocks a worker would have to prefill, against the blocks it would hold active
  (scheduler.py). 1.0 values them alike (Dynamo's default); but a prefill block costs its
  compute once (~0.5 ms of a step for a 1B model on an H100, the mocker's timing model)
  while a block more in a batch costs next to nothing until the cache or the batch fills,
  and a user moved off the worker holding its history has it prefilled and cached twice.
  On the shared-prefix multi-turn benchmark (bench/README.md) 1.0 moved a third of the
  turns over load differences of one or two requests and reached 78-80% hit rate, 4.0
  reached 87.6% against a 90.3% oracle. Lower it for load balance (ITL), raise it for
  cache reuse (TTFT); 0 balances load only.
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
    overlap_score_weight: float = Field(4.0, ge=0)
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
