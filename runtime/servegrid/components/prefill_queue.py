"""The prefill queue: its name, its item format and its settings, shared by both ends.

A decode worker enqueues one ``PrefillQueueItem`` per prompt it prefills remotely; prefill
workers pull them from the namespace's JetStream work queue. The consumers (prefill workers)
own the queue's ``ack_wait``; producers open it without one.
"""

from __future__ import annotations

from typing import Any

import msgspec

from servegrid.distributed.events import WorkQueue
from servegrid.engines.base import EngineRequest
from servegrid.kv_transfer.wire import KvTarget

PREFILL_QUEUE = "prefill_queue"
# Seconds a prefill worker may hold an item without a sign of life before it goes to another
# one. Prefill workers report progress every third of it, so a long prefill is not redelivered.
DEFAULT_ACK_WAIT_S = 10.0


class PrefillQueueItem(msgspec.Struct, omit_defaults=True):
    request: EngineRequest
    target: KvTarget  # where the KV goes: the decode worker's bulk listener and reservation
    deadline: float  # wall-clock time after which the decode worker has prefilled locally
    decode_instance: int = 0  # for logs: which decode worker asked


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PrefillQueueItem)


def encode_item(item: PrefillQueueItem) -> bytes:
    return _encoder.encode(item)


def decode_item(data: bytes) -> PrefillQueueItem:
    return _decoder.decode(data)


async def open_prefill_queue(runtime: Any, namespace: str, ack_wait: float | None) -> WorkQueue:
    """The namespace's prefill queue; ``ack_wait=None`` for a producer (see module doc)."""
    queue = await runtime.namespace(namespace).work_queue(PREFILL_QUEUE, ack_wait=ack_wait)
    await queue.start()
    return queue
