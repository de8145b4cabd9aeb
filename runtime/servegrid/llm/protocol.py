"""Internal wire types between frontend, processor, router and worker (msgspec, not pydantic).

Processor → worker is ``EngineRequest``: token ids and sampling parameters; the worker answers
with ``EngineOutput``s. They are defined here, below both the Processor and the engines (which
re-export them from ``engines/base.py``), so neither package imports the other's internals.

The OpenAI request models live in ``openai_protocol`` and are validated once, at the HTTP edge;
everything behind the frontend speaks these structs.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "EngineOutput",
    "EngineRequest",
    "GenerateChunk",
    "RouteRequest",
    "RouteResponse",
    "SamplingParams",
    "TextRequest",
]


class SamplingParams(msgspec.Struct, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False


class EngineRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)


class EngineOutput(msgspec.Struct, omit_defaults=True, array_like=True):
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first output only)


class TextRequest(msgspec.Struct, omit_defaults=True):
    """What the frontend hands the processor: one validated OpenAI request, either kind."""

    request_id: str
    model: str
    kind: str  # "chat" | "completion"
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completion
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False
    echo: bool = False


class GenerateChunk(msgspec.Struct, omit_defaults=True, array_like=True):
    """What the processor streams back: new text plus running token counts."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0  # cumulative
    prompt_tokens: int = 0  # set on the first chunk
    cached_tokens: int = 0  # set on the first chunk
    worker_id: int = 0  # first chunk: the worker chosen (for the frontend's routing metrics)
    overlap_blocks: int = 0  # first chunk: prompt blocks the router found cached there


class RouteRequest(msgspec.Struct, omit_defaults=True):
    """Processor → router: which worker should serve these tokens?"""

    token_ids: list[int]
    request_id: str = ""


class RouteResponse(msgspec.Struct, omit_defaults=True):
    worker_id: int
    overlap_blocks: int = 0
