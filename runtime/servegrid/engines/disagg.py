"""The engine side of disaggregated serving: reserve KV blocks, fill them from elsewhere, go on.

One interface for every engine; the transfer layer (``servegrid.kv_transfer``) drives it:

decode worker                                   prefill worker
-------------                                   --------------
``reserve_kv(request)`` → ``KvReservation``      (pulls the request from the prefill queue)
                                                ``prefill_kv(request, first, n)`` → ``PrefilledKv``
``kv_buffers(reservation, sizes)``  ◀── bulk ──  its ``segments`` (real tensors), or none
``commit_kv(reservation)``                      ``PrefilledKv.release()``
``generate_reserved(reservation)`` (decodes on from the received blocks)
``release_kv(reservation)`` when it gives up (deadline, client gone) and prefills locally.

The remote KV covers prompt tokens ``[first_token, num_tokens)``: ``first_token`` is what the
decode worker's own prefix cache already holds, and ``num_tokens`` is the prompt length minus
one. The decode worker computes the last prompt token itself and samples from it, exactly as
an aggregated worker whose cache holds the whole prompt does (vLLM leaves one token to compute
too), so a disaggregated request yields the same tokens as an aggregated one.

An engine without real tensors (the mocker) ships no segments; the transfer then takes the
time ``logical_bytes`` ÷ the configured bandwidth, ``logical_bytes`` coming from the model's
layers, KV heads, head size and dtype (``KvLayout``).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from servegrid.engines.base import EngineConfigError, EngineOutput, EngineRequest, SamplingParams

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8": 1,
    "fp8": 1,
    "float8_e4m3fn": 1,
    "int8": 1,
}


class KvLayout(msgspec.Struct, frozen=True):
    """The shape of one token's KV cache: what a transfer of ``n`` tokens moves."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * self.dtype_bytes  # K, V

    def bytes_for(self, tokens: int) -> int:
        return max(tokens, 0) * self.bytes_per_token

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any], where: str = "config.json") -> KvLayout:
        """From a Hugging Face ``config.json`` (llama-style key names)."""
        try:
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_size = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineConfigError(
                f"{where}: cannot size the KV cache ({type(exc).__name__}: {exc}); it needs "
                "num_hidden_layers, num_attention_heads and hidden_size or head_dim"
            ) from None
        dtype = str(config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
        if dtype not in _DTYPE_BYTES:
            raise EngineConfigError(
                f"{where}: torch_dtype {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}"
            )
        return cls(layers, kv_heads, head_size, _DTYPE_BYTES[dtype])


@dataclass(eq=False)
class KvReservation:
    """Blocks a decode worker holds for a prompt whose KV is computed elsewhere.

    Owned by the engine that made it; ``state`` is the engine's own (the mocker's sequence).
    """

    request: EngineRequest
    first_token: int  # prompt tokens already in this worker's cache (not transferred)
    num_tokens: int  # the transferred KV ends here: prompt length - 1
    block_ids: list[int]
    state: Any = None
    committed: bool = False


@dataclass(eq=False)
class PrefilledKv:
    """KV a prefill worker computed, held until the transfer is done (``release``)."""

    first_token: int
    num_tokens: int
    logical_bytes: int  # what moving this KV costs on a real link
    segments: list[memoryview] = field(default_factory=list)  # the bytes to ship; [] = none
    release: Callable[[], None] = lambda: None


class KvTransferEngine(abc.ABC):
    """What an engine implements to take part in disaggregated serving."""

    @abc.abstractmethod
    def kv_layout(self) -> KvLayout: ...

    @abc.abstractmethod
    def prefix_hit_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens this engine's prefix cache holds now."""

    # -- decode side ---------------------------------------------------------------------
    @abc.abstractmethod
    def reserve_kv(self, request: EngineRequest) -> KvReservation | None:
        """Hold blocks for ``request``'s prompt; None when the cache has no room now.

        Raises the errors ``generate`` would (EngineRequestError, PromptTooLongError).
        """

    def kv_transfer_limit(self, reservation: KvReservation) -> int:
        """The most bytes a transfer into ``reservation`` may announce; the bulk path refuses
        a larger one before reading any of it. By default the KV of the reserved tokens, from
        the model's layout; an engine that ships whole blocks allows its reserved blocks."""
        return self.kv_layout().bytes_for(reservation.num_tokens - reservation.first_token)

    @abc.abstractmethod
    def kv_buffers(self, reservation: KvReservation, sizes: list[int]) -> list[memoryview]:
        """Writable buffers of ``sizes`` bytes that the transfer fills, in order."""

    @abc.abstractmethod
    def commit_kv(self, reservation: KvReservation) -> None:
        """The buffers are filled: the reserved blocks now hold the prompt's KV."""

    @abc.abstractmethod
    def generate_reserved(self, reservation: KvReservation) -> AsyncIterator[EngineOutput]:
        """Decode from committed blocks; like ``generate`` otherwise (closing aborts)."""

    @abc.abstractmethod
    def release_kv(self, reservation: KvReservation) -> None:
        """Give the blocks back (a reservation that will not be used). Idempotent."""

    # -- prefill side --------------------------------------------------------------------
    @abc.abstractmethod
    async def prefill_kv(
        self, request: EngineRequest, first_token: int, num_tokens: int
    ) -> PrefilledKv:
        """Compute the prompt's KV and expose tokens ``[first_token, num_tokens)`` of it."""


def prefill_only(request: EngineRequest) -> EngineRequest:
    """The request a prefill worker runs: the whole prompt, one sampled token, no early stop."""
    return EngineRequest(
        request.request_id,
        request.token_ids,
        SamplingParams(max_tokens=1, ignore_eos=True),
        lora_name=request.lora_name,
    )


def supports_kv_transfer(engine: object) -> bool:
    return isinstance(engine, KvTransferEngine)
