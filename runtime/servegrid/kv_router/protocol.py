"""The KV event plane's wire format and subject names, defined once.

A worker publishes on two subjects of its namespace (``events.subject_for``):

- ``kv_events.<Component>``: ``KvEventBatch`` frames, the engine's ``KvEvent``s (blocks
  stored / removed / all cleared) in the order they happened, numbered by a per-worker
  sequence that starts at 1 and grows by one per batch. A router that sees a number other
  than ``last + 1`` has lost or reordered frames and re-synchronises that worker by calling
  its ``kv_blocks`` endpoint, which answers a ``KvSnapshot``: every block the worker holds
  and the sequence number of the last batch that snapshot already reflects.
- ``kv_load.<Component>``: ``LoadReport`` frames at a bounded rate: the engine's load and the
  ids of the requests it received and of those that finished since the previous report (a
  router stops counting its own in-flight estimate for a request once the worker's report
  covers it, and the request's prompt blocks as in use once it finished).

``<Component>`` is the worker's service name (``Worker``): decode workers of one graph share
it, prefill workers (another component) publish apart and are not routing targets.
"""

from __future__ import annotations

import msgspec

from servegrid.distributed.events import subject_for
from servegrid.engines.base import KvEvent

KV_EVENTS = "kv_events"
KV_LOAD = "kv_load"
#: the Worker endpoint that answers a ``KvSnapshot`` (re-synchronisation)
KV_BLOCKS_ENDPOINT = "kv_blocks"


def kv_events_subject(namespace: str, component: str) -> str:
    return subject_for(namespace, f"{KV_EVENTS}.{component}")


def kv_load_subject(namespace: str, component: str) -> str:
    return subject_for(namespace, f"{KV_LOAD}.{component}")


class KvEventBatch(msgspec.Struct, array_like=True):
    """Events of one worker, in order; ``seq`` is this batch's number (1, 2, ...)."""

    worker_id: int
    seq: int
    events: list[KvEvent]


class LoadReport(msgspec.Struct, array_like=True, omit_defaults=True):
    worker_id: int
    active_blocks: int
    total_blocks: int
    active_requests: int
    waiting_requests: int
    #: request ids this worker received since its previous report
    received: list[str] = []
    #: request ids whose stream ended (done, failed or cancelled) since its previous report
    finished: list[str] = []


class KvSnapshot(msgspec.Struct, array_like=True):
    """Every block hash a worker's cache holds, as of its batch number ``seq``."""

    worker_id: int
    seq: int
    block_hashes: list[int]


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(KvEventBatch)
_load_decoder = msgspec.msgpack.Decoder(LoadReport)


def encode(frame: KvEventBatch | LoadReport | KvSnapshot) -> bytes:
    return _batch_encoder.encode(frame)


def decode_batch(payload: bytes) -> KvEventBatch:
    return _batch_decoder.decode(payload)


def decode_load(payload: bytes) -> LoadReport:
    return _load_decoder.decode(payload)
