"""The engine interface a Worker drives.

An engine takes pre-tokenized requests and yields token ids as it produces them. One
``EngineOutput`` carries every token the engine made for that request in one scheduler
step (usually one; several when the reader is behind), so the worker can forward them in
one frame. Engines also report KV-cache events and load, which the router consumes.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable

import msgspec

from servegrid.errors import ContextLengthExceededError, InvalidRequestError

# The request and output types are wire types shared with the Processor; they live below
# both (llm/protocol.py) and are re-exported here as the engine interface's types.
from servegrid.llm.protocol import EngineOutput, EngineRequest, SamplingParams

__all__ = [
    "Engine",
    "EngineConfigError",
    "EngineOutput",
    "EngineRequest",
    "EngineRequestError",
    "KvEvent",
    "KvEventSink",
    "LoadMetrics",
    "PromptTooLongError",
    "SamplingParams",
]


STORED, REMOVED, CLEARED = "stored", "removed", "cleared"


class KvEvent(msgspec.Struct, omit_defaults=True):
    """Blocks that entered (``stored``) or left (``removed``) a worker's KV cache, or all
    of them left at once (``cleared``).

    ``block_hashes`` are chained hashes of full token blocks (``llm.kv_hash.block_hashes``),
    parent first; ``parent_hash`` is the hash of the block before the first one (None at a
    sequence's start). A block whose KV arrived from elsewhere (a remote prefill) is reported
    ``stored`` exactly like one computed here: the router only cares what the cache holds.
    """

    kind: str  # STORED | REMOVED | CLEARED
    block_hashes: list[int] = []
    parent_hash: int | None = None


class LoadMetrics(msgspec.Struct):
    active_blocks: int = 0
    total_blocks: int = 0
    active_requests: int = 0
    waiting_requests: int = 0


KvEventSink = Callable[[KvEvent], None]


class Engine(abc.ABC):
    """A token generator. Implementations: mocker, echo, torch, vllm (``engines/registry.py``)."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield outputs until one carries a ``finish_reason``.

        Closing the iterator early (``aclose``, or the consumer going away) aborts the
        request and frees its KV blocks.
        """

    @abc.abstractmethod
    def load_metrics(self) -> LoadMetrics: ...

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Where to report KV events; engines without a KV cache ignore it.

        The engine calls ``sink(event)`` on its event loop, synchronously, in the order the
        cache changed; the Worker numbers and publishes them (kv_router.publisher).
        """
        return None

    def lora_names(self) -> list[str]:
        """LoRA adapters loaded now: a request may name one (``EngineRequest.lora_name``)."""
        return []

    async def load_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (PEFT format directory) under ``name``; engines without LoRA
        support refuse."""
        raise EngineConfigError(f"this engine does not run LoRA adapters (asked for {name!r})")

    def cached_block_hashes(self) -> list[int]:
        """Every block hash the cache holds now, any order (a router's re-synchronisation).

        Must agree with the events sent so far: called on the event loop between events.
        """
        return []

    @abc.abstractmethod
    async def stop(self) -> None: ...


class EngineRequestError(InvalidRequestError):
    """A request this engine can never serve, whatever its load: a client error."""


class PromptTooLongError(EngineRequestError, ContextLengthExceededError):
    """The prompt does not fit the engine's ``max-model-len`` (or its whole KV cache)."""


class EngineConfigError(ValueError):
    """An engine's config has a bad or unknown value; the message names the key."""
