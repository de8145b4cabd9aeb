"""The etcd discovery backend: the cluster's registry of instances.

One ``EtcdDiscovery`` belongs to one process and holds one lease. Every entry it registers is
bound to that lease, which a background task keeps alive every ``ttl / 3`` seconds. The store
may go away (etcd restarted, network cut) without any service restarting:

- keepalive failures are logged once per outage and retried every second;
- when etcd answers again, a lease that expired meanwhile is replaced by a new one and every
  registered entry is put again (entries registered during the outage too);
- a watch reconnects, lists the prefix again and yields the difference to what it had reported,
  so a watcher keeps its last-known membership during the outage and catches up afterwards;
  entries missing after the outage are reported gone only if still missing one keepalive
  interval later (etcd may have come back with an empty store, and their owners put them again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import msgspec

from servegrid.distributed import env
from servegrid.distributed.discovery.base import (
    Discovery,
    DiscoveryEvent,
    InstanceInfo,
    decode_instance,
    encode_instance,
    now,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
# etcd rounds shorter leases up to its minimum (about 2 s with default election settings).
MIN_LEASE_SECONDS = 2
RETRY_INITIAL = 0.2
RETRY_MAX = 1.0

# gRPC otherwise backs off up to 2 minutes between reconnects, far longer than a lease.
_GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
    # Detect a peer that vanished without closing the connection (a cut cable, a frozen host).
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}

# What a store that is down or unreachable raises through aetcd and gRPC.
_STORE_ERRORS = (aetcd.exceptions.ClientError, OSError, asyncio.TimeoutError)


class EtcdUnavailableError(ConnectionError):
    """etcd could not be reached at any configured endpoint."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``http://host:port``, ``host:port`` or ``host`` to ``(host, port)``."""
    text = endpoint.strip()
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in ("http", "grpc"):
            raise ValueError(
                f"etcd endpoint {endpoint!r}: scheme {scheme!r} is not supported (TLS is not "
                "implemented); use http://HOST:PORT"
            )
    else:
        text = "//" + text
    parts = urlsplit(text)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(
            f"etcd endpoint {endpoint!r} has a bad port; use http://HOST:PORT"
        ) from None
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {endpoint!r} has no host; use http://HOST:PORT")
    return parts.hostname, port


def parse_endpoints(endpoints: str | list[str]) -> list[tuple[str, int]]:
    """Endpoints from a list or from the comma-separated ``ETCD_ENDPOINTS`` format."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = [parse_endpoint(item) for item in items if item.strip()]
    if not parsed:
        raise ValueError(f"no etcd endpoints given; set {env.ETCD_ENDPOINTS}=http://HOST:2379")
    return parsed


class EtcdDiscovery(Discovery):
    """Discovery in etcd, with one lease per process that survives etcd outages."""

    def __init__(
        self,
        endpoints: str | list[str],
        ttl: float | None = None,
        *,
        op_timeout: float = 3.0,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        self._ttl = env.lease_ttl() if ttl is None else float(ttl)
        self._lease_seconds = max(MIN_LEASE_SECONDS, math.ceil(self._ttl))
        self._keepalive_interval = self._ttl / 3
        # How long after an outage a watcher waits for owners to register again (owners with
        # the same TTL retry at least this often) before it reports their entries gone.
        self._resync_grace = self._keepalive_interval + RETRY_MAX
        self._op_timeout = op_timeout

        self._client: aetcd.Client | None = None
        self._client_generation = 0
        self._endpoint_index = 0

        self._lease_id: int | None = None
        self._entries: dict[str, InstanceInfo] = {}
        self._pending_deletes: set[str] = set()
        # Set when the store may be missing entries of ours (failed put, new lease).
        self._dirty = False
        self._write_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._keepalive_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def endpoints_text(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self._endpoints)

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    # -- connection -------------------------------------------------------------------------

    def _current_client(self) -> tuple[aetcd.Client, int]:
        if self._closed:
            raise EtcdUnavailableError("discovery is closed")
        if self._client is None:
            host, port = self._endpoints[self._endpoint_index]
            self._client = aetcd.Client(
                host=host, port=port, timeout=self._op_timeout, options=_GRPC_OPTIONS
            )
        return self._client, self._client_generation

    async def _drop_client(self, generation: int) -> None:
        """Forget a client that failed and move to the next endpoint.

        A fresh channel connects at once instead of waiting out gRPC's backoff. Only the first
        task to report a failure of one client replaces it.
        """
        if generation != self._client_generation or self._client is None:
            return
        client, self._client = self._client, None
        self._client_generation += 1
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
        with contextlib.suppress(Exception):
            await client.close()

    def _unavailable(self, error: BaseException) -> EtcdUnavailableError:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return EtcdUnavailableError(
            f"etcd is unreachable at {self.endpoints_text} ({detail}); check that etcd runs "
            f"there and that {env.ETCD_ENDPOINTS} is right"
        )

    async def _call(self, op):
        """Run ``op(client)`` once; a store failure drops the client and raises
        ``EtcdUnavailableError``."""
        client, generation = self._current_client()
        try:
            return await op(client)
        except _STORE_ERRORS as error:
            await self._drop_client(generation)
            raise self._unavailable(error) from error

    # -- lease and registrations -------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._keepalive_task is not None:
                return
            async with self._write_lock:
                await self._grant_lease()
            self._keepalive_task = asyncio.create_task(
                self._keepalive_loop(), name="etcd-lease-keepalive"
            )

    async def _grant_lease(self) -> None:
        lease = await self._call(lambda client: client.lease(self._lease_seconds))
        self._lease_id = lease.id
        log.debug("etcd lease %x granted, ttl %ss", lease.id, lease.ttl)

    async def _put(self, info: InstanceInfo) -> None:
        key, value, lease = info.key.encode(), encode_instance(info), self._lease_id
        await self._call(lambda client: client.put(key, value, lease=lease))

    async def register(self, info: InstanceInfo) -> None:
        if info.registered_at == 0.0:
            info = msgspec.structs.replace(info, registered_at=now())
        await self.start()
        async with self._write_lock:
            self._entries[info.key] = info
            self._pending_deletes.discard(info.key)
            try:
                await self._put(info)
            except EtcdUnavailableError as error:
                # The keepalive task puts it as soon as etcd answers: a service need not wait.
                self._dirty = True
                log.warning("registration of %s deferred: %s", info.key, error)

    async def unregister(self, info: InstanceInfo) -> None:
        async with self._write_lock:
            self._entries.pop(info.key, None)
            key = info.key.encode()
            try:
                await self._call(lambda client: client.delete(key))
            except EtcdUnavailableError as error:
                self._pending_deletes.add(info.key)
                self._dirty = True
                log.warning("removal of %s deferred: %s", info.key, error)

    async def _keepalive_once(self) -> None:
        async with self._write_lock:
            lease_id = self._lease_id
            alive = False
            if lease_id is not None:
                reply = await self._call(lambda client: client.refresh_lease(lease_id))
                if reply is None:
                    raise EtcdUnavailableError("etcd closed the lease keepalive stream")
                alive = reply.TTL > 0
            if not alive:
                if lease_id is not None:
                    log.warning(
                        "etcd lease %x expired; granting a new one and registering %d entries "
                        "again",
                        lease_id,
                        len(self._entries),
                    )
                await self._grant_lease()
                self._dirty = True
            if self._dirty:
                for info in list(self._entries.values()):
                    await self._put(info)
                for key in list(self._pending_deletes):
                    encoded = key.encode()
                    await self._call(lambda client, k=encoded: client.delete(k))
                    self._pending_deletes.discard(key)
                self._dirty = False

    async def _keepalive_loop(self) -> None:
        healthy = True
        delay = self._keepalive_interval
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                await self._keepalive_once()
            except EtcdUnavailableError as error:
                if healthy:
                    log.warning("etcd lease keepalive failed, retrying: %s", error)
                healthy = False
                delay = min(RETRY_MAX, self._keepalive_interval)
                continue
            except Exception:
                # Never let the keepalive die: a dead keepalive silently unregisters us.
                log.exception("unexpected error in etcd lease keepalive; retrying")
                healthy = False
                delay = min(RETRY_MAX, self._keepalive_interval)
                continue
            if not healthy:
                log.warning("etcd reachable again; %d entries registered", len(self._entries))
            healthy = True
            delay = self._keepalive_interval

    # -- reads -------------------------------------------------------------------------------

    async def _listing(self, prefix: str) -> tuple[dict[str, InstanceInfo], int]:
        """Every decodable entry under ``prefix`` and the store revision of that listing."""
        encoded = prefix.encode()
        result = await self._call(lambda client: client.get_prefix(encoded))
        entries: dict[str, InstanceInfo] = {}
        for kv in result:
            key = kv.key.decode()
            try:
                entries[key] = decode_instance(kv.value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.debug("skipping %s: not an instance entry", key)
        return entries, result.header.revision

    async def list(self, prefix: str) -> list[InstanceInfo]:
        entries, _ = await self._listing(prefix)
        return list(entries.values())

    async def watch(self, prefix: str) -> AsyncIterator[DiscoveryEvent]:
        known: dict[str, InstanceInfo] = {}
        delay = RETRY_INITIAL
        reported_outage = False
        while not self._closed:
            stream = None
            generation = -1
            try:
                current, revision = await self._listing(prefix)
                if reported_outage and any(key not in current for key in known):
                    # After an outage a missing entry is not yet a dead instance: etcd may have
                    # come back with an empty store, and live owners put their entries again
                    # at their next keepalive. Keep reporting them until then, and look again.
                    await asyncio.sleep(self._resync_grace)
                    current, revision = await self._listing(prefix)
                for key in [key for key in known if key not in current]:
                    del known[key]
                    yield DiscoveryEvent("delete", key, None)
                for key, info in current.items():
                    if known.get(key) != info:
                        known[key] = info
                        yield DiscoveryEvent("put", key, info)
                client, generation = self._current_client()
                stream = await client.watch_prefix(prefix.encode(), start_revision=revision + 1)
                if reported_outage:
                    log.warning("etcd watch on %s resumed", prefix)
                reported_outage = False
                delay = RETRY_INITIAL
                async for event in stream:
                    key = event.kv.key.decode()
                    if event.kind == aetcd.rtypes.EventKind.DELETE:
                        if known.pop(key, None) is not None:
                            yield DiscoveryEvent("delete", key, None)
                        continue
                    try:
                        info = decode_instance(event.kv.value)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue
                    known[key] = info
                    yield DiscoveryEvent("put", key, info)
                # The stream ended without an error: its client was closed or replaced.
            except (EtcdUnavailableError, *_STORE_ERRORS) as error:
                if generation >= 0:
                    await self._drop_client(generation)
                if not reported_outage:
                    log.warning(
                        "etcd watch on %s lost (%s); keeping %d known entries and retrying",
                        prefix,
                        error,
                        len(known),
                    )
                reported_outage = True
            finally:
                if stream is not None:
                    with contextlib.suppress(Exception):
                        await stream.cancel()
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    # -- shutdown ----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lease_id = self._lease_id
        self._lease_id = None
        if lease_id is not None:
            try:
                await self._call(lambda client: client.revoke_lease(lease_id))
            except EtcdUnavailableError as error:
                log.warning(
                    "could not revoke etcd lease %x (it expires by itself): %s", lease_id, error
                )
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
