"""The discovery interface: where instances announce themselves and clients find them.

Keys follow one layout, defined here and nowhere else:

    servegrid/{namespace}/instances/{component}/{endpoint}/{instance_id}

An entry is bound to a lease that its process keeps alive; when the process dies the lease
expires and the entry disappears. Backends: ``file`` (one host, no server) and ``etcd``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import msgspec

KEY_ROOT = "servegrid"


def instance_prefix(
    namespace: str, component: str | None = None, endpoint: str | None = None
) -> str:
    """The key prefix under which instances of a namespace (component, endpoint) live."""
    parts = [KEY_ROOT, namespace, "instances"]
    if component is not None:
        parts.append(component)
        if endpoint is not None:
            parts.append(endpoint)
    return "/".join(parts) + "/"


class InstanceInfo(msgspec.Struct, frozen=True):
    """One running copy of an endpoint, as stored in discovery."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    host: str
    port: int
    metadata: dict = {}
    registered_at: float = 0.0

    @property
    def key(self) -> str:
        return (
            f"{instance_prefix(self.namespace, self.component, self.endpoint)}{self.instance_id:x}"
        )

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(InstanceInfo)


def encode_instance(info: InstanceInfo) -> bytes:
    return _encoder.encode(info)


def decode_instance(data: bytes) -> InstanceInfo:
    return _decoder.decode(data)


@dataclass(frozen=True, slots=True)
class DiscoveryEvent:
    """A change seen by a watch: ``put`` (new or re-registered) or ``delete``."""

    kind: Literal["put", "delete"]
    key: str
    instance: InstanceInfo | None  # None for deletes


class Discovery(abc.ABC):
    """A lease-bound key/value registry of instances.

    One Discovery object belongs to one process and owns one lease: every ``register`` call
    binds its entry to that lease, and ``close`` revokes it. Implementations keep the lease
    alive in the background and re-register their entries on their own after a lost lease
    or a store outage, so that a service never has to restart because discovery blinked.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and create the lease. Idempotent."""

    @abc.abstractmethod
    async def register(self, info: InstanceInfo) -> None:
        """Publish ``info`` under ``info.key``, bound to this process's lease."""

    @abc.abstractmethod
    async def unregister(self, info: InstanceInfo) -> None:
        """Remove one entry of this process (used when draining before shutdown)."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[InstanceInfo]:
        """Every live entry under ``prefix``."""

    @abc.abstractmethod
    def watch(self, prefix: str) -> AsyncIterator[DiscoveryEvent]:
        """Yield a ``put`` for every entry that exists now, then changes as they happen.

        The iterator survives store outages: on reconnect it yields the difference between
        what it had reported and what exists now.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Revoke the lease (entries vanish) and release resources. Idempotent."""


def now() -> float:
    return time.time()
