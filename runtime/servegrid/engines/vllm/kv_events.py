"""vLLM's KV cache events → servegrid's ``KvEvent``s, with servegrid's block hashes.

vLLM publishes ``EventBatch``es over ZMQ (``vllm.distributed.kv_events``): multipart messages
``[topic, sequence (8 bytes, big-endian), msgpack payload]``. The payload is an array
``[ts, events, data_parallel_rank?]``; each event is a tagged array ``[tag, fields...]``:

- ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, ...]``
- ``["BlockRemoved", block_hashes, ...]``
- ``["AllBlocksCleared"]``

vLLM's block hashes are its own (a different function, and bytes in newer releases), while
the KV router indexes servegrid's chained hashes (``llm.kv_hash``) that the processor computes
from token ids. So the translator recomputes servegrid's hash of every stored block from the
event's ``token_ids``, chained from its parent's servegrid hash, and keeps a map from vLLM's
hash to servegrid's to translate removals. A stored block whose parent it never saw (events
lost before this worker subscribed) cannot be chained and is skipped with a warning; the
router's re-synchronisation asks ``hashes()`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from servegrid.engines.base import CLEARED, REMOVED, STORED, KvEvent
from servegrid.llm.kv_hash import block_hashes

log = logging.getLogger(__name__)

_decoder = msgspec.msgpack.Decoder()


def _key(value: Any) -> Any:
    # msgpack gives lists for arrays; hashes are ints or bytes, usable as dict keys as they are.
    return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


class VllmKvEventTranslator:
    def __init__(self, sink: Callable[[KvEvent], None] | None = None) -> None:
        self.sink = sink
        self._ours: dict[Any, int] = {}  # vLLM block hash -> servegrid block hash
        self.skipped_blocks = 0
        self.batches = 0
        self.last_sequence: int | None = None
        self.gaps = 0

    def hashes(self) -> list[int]:
        """Servegrid hashes of every block vLLM's cache holds, as far as events told."""
        return list(self._ours.values())

    def feed_message(self, frames: list[bytes]) -> list[KvEvent]:
        """One ZMQ multipart message ``[topic, seq, payload]``."""
        if len(frames) != 3:
            log.warning("vllm KV events: a message of %d frames, expected 3", len(frames))
            return []
        sequence = int.from_bytes(frames[1], "big")
        if self.last_sequence is not None and sequence != self.last_sequence + 1:
            self.gaps += 1
            log.warning(
                "vllm KV events: sequence %d after %d; events were lost",
                sequence,
                self.last_sequence,
            )
        self.last_sequence = sequence
        return self.feed_payload(frames[2])

    def feed_payload(self, payload: bytes) -> list[KvEvent]:
        batch = _decoder.decode(payload)
        if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
            log.warning("vllm KV events: an undecodable batch was dropped")
            return []
        self.batches += 1
        out: list[KvEvent] = []
        for event in batch[1]:
            translated = self._translate(event)
            if translated is not None:
                out.append(translated)
        if self.sink is not None:
            for event in out:
                self.sink(event)
        return out

    def _translate(self, event: Any) -> KvEvent | None:
        if not isinstance(event, list) or not event:
            return None
        tag = event[0]
        if tag == "BlockStored":
            vllm_hashes, parent, token_ids, block_size = event[1], event[2], event[3], event[4]
            parent_ours: int | None = None
            if parent is not None:
                parent_ours = self._ours.get(_key(parent))
                if parent_ours is None:
                    self.skipped_blocks += len(vllm_hashes)
                    log.warning(
                        "vllm KV events: %d stored blocks follow a block never reported; "
                        "skipped until the router re-synchronises",
                        len(vllm_hashes),
                    )
                    return None
            ours = block_hashes(token_ids, int(block_size), parent_ours)
            if len(ours) != len(vllm_hashes):
                log.warning(
                    "vllm KV events: %d block hashes for %d tokens of block size %s; skipped",
                    len(vllm_hashes),
                    len(token_ids),
                    block_size,
                )
                return None
            for theirs, mine in zip(vllm_hashes, ours, strict=True):
                self._ours[_key(theirs)] = mine
            return KvEvent(STORED, ours, parent_ours)
        if tag == "BlockRemoved":
            removed = [self._ours.pop(_key(h)) for h in event[1] if _key(h) in self._ours]
            return KvEvent(REMOVED, removed) if removed else None
        if tag == "AllBlocksCleared":
            self._ours.clear()
            return KvEvent(CLEARED)
        return None


class ZmqKvEventSubscriber:
    """Binds a ZMQ SUB socket on ``endpoint`` (loopback) that vLLM's publisher connects to."""

    def __init__(self, endpoint: str, topic: str, translator: VllmKvEventTranslator) -> None:
        self.endpoint = endpoint
        self.topic = topic
        self.translator = translator
        self._task: asyncio.Task[None] | None = None
        self._socket: Any = None

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self._socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        self._socket.bind(self.endpoint)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vllm-kv-events")

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self.translator.feed_message(frames)
            except Exception:
                log.exception("vllm KV events: a batch could not be translated")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
