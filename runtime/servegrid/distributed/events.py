"""The event plane and the work queue interfaces (NATS in practice).

Subjects are namespaced: ``subject_for("dynamo", "kv_events")`` is
``servegrid.dynamo.kv_events``. The event plane is fire-and-forget pub/sub (KV-cache events,
load metrics); the work queue is at-least-once delivery to exactly one consumer (the prefill
queue): an item is acked after the work is done and redelivered when a consumer dies first.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator


def subject_for(namespace: str, subject: str) -> str:
    return f"servegrid.{namespace}.{subject}"


class Subscription(abc.ABC):
    """An async iterator of message payloads; ``unsubscribe`` ends it."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def unsubscribe(self) -> None: ...


class EventPlane(abc.ABC):
    @abc.abstractmethod
    async def publish(self, subject: str, payload: bytes) -> None:
        """Publish on an already namespaced subject (see ``subject_for``)."""

    @abc.abstractmethod
    async def subscribe(self, subject: str) -> Subscription:
        """Subscribe to a namespaced subject; survives server restarts by itself."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class WorkItem(abc.ABC):
    data: bytes

    @abc.abstractmethod
    async def ack(self) -> None:
        """The work is done: remove the item from the queue."""

    @abc.abstractmethod
    async def nak(self, delay: float = 0.0) -> None:
        """Give the item back for redelivery (after ``delay`` seconds)."""


class WorkQueue(abc.ABC):
    """A named queue shared by every producer and consumer of one namespace."""

    @abc.abstractmethod
    async def enqueue(self, data: bytes, item_id: str | None = None) -> None:
        """Add an item. With ``item_id`` (unique per item), a send that is retried after a
        lost acknowledgement stores the item once, not twice."""

    @abc.abstractmethod
    async def dequeue(self, timeout: float = 1.0) -> WorkItem | None:
        """The next item, or None when none arrived within ``timeout`` seconds."""

    @abc.abstractmethod
    async def depth(self) -> int:
        """Items waiting (not yet delivered or awaiting redelivery)."""

    @abc.abstractmethod
    async def close(self) -> None: ...
