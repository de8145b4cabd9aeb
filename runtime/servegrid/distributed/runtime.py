"""DistributedRuntime: namespace → component → endpoint, over discovery and the request plane.

    runtime = await DistributedRuntime.from_env()
    ep = runtime.namespace("demo").component("Worker").endpoint("generate")
    await ep.serve(handler)                      # register and serve
    client = await ep.client()                   # find instances and call them
    async for item in await client.round_robin(payload): ...

One runtime per process: one discovery lease, one request-plane listener for every endpoint
the process serves, one pool of client connections, one NATS connection (when configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from servegrid.distributed import env
from servegrid.distributed.backends import discovery_from_env, nats_url_from_env
from servegrid.distributed.client import EndpointClient
from servegrid.distributed.discovery.base import Discovery, InstanceInfo, now
from servegrid.distributed.events import EventPlane, Subscription, WorkQueue, subject_for
from servegrid.distributed.secret import load_cluster_secret, require_secret_for_bind
from servegrid.distributed.transport.client import ConnectionPool
from servegrid.distributed.transport.server import Handler, RequestPlaneServer

if TYPE_CHECKING:
    from servegrid.distributed.nats_plane import NatsConnection

log = logging.getLogger(__name__)


def _advertise_and_bind() -> tuple[str, str]:
    try:
        from servegrid.distributed.net import advertise_host, bind_host

        return advertise_host(), bind_host()
    except ImportError:  # pragma: no cover - net.py ships with the cluster runtime
        return "127.0.0.1", "127.0.0.1"


class DistributedRuntime:
    def __init__(
        self,
        discovery: Discovery,
        *,
        advertise_host: str = "127.0.0.1",
        bind_host: str = "127.0.0.1",
        nats_url: str | None = None,
        cluster_secret: str | None = None,
    ) -> None:
        self.discovery = discovery
        self.advertise_host = advertise_host
        # Other listeners of this process (the KV transfer path) authenticate with it too.
        self.cluster_secret = cluster_secret
        self.server = RequestPlaneServer(
            bind_host, 0, secret=cluster_secret, max_streams=env.max_streams_per_connection()
        )
        self.pool = ConnectionPool(secret=cluster_secret)
        self.nats_url = nats_url
        self._registered: list[InstanceInfo] = []
        self._clients: dict[tuple[str, str, str], EndpointClient] = {}
        self._nats: NatsConnection | None = None
        self._event_plane: EventPlane | None = None
        self._nats_lock = asyncio.Lock()

    @classmethod
    async def from_env(cls) -> DistributedRuntime:
        advertise, bind = _advertise_and_bind()
        secret = load_cluster_secret()
        # Fail at start, not at the first endpoint: the same check ``RequestPlaneServer.start``
        # makes, before discovery or NATS are touched.
        require_secret_for_bind(bind, secret is not None)
        runtime = cls(
            discovery_from_env(),
            advertise_host=advertise,
            bind_host=bind,
            nats_url=nats_url_from_env(),
            cluster_secret=secret,
        )
        await runtime.discovery.start()
        return runtime

    def namespace(self, name: str) -> Namespace:
        return Namespace(self, name)

    # -- serving -------------------------------------------------------------------------
    async def serve_endpoint(
        self,
        namespace: str,
        component: str,
        endpoint: str,
        handler: Handler,
        *,
        instance_id: int,
        request_type: Any = None,
        streaming: bool | None = None,
        metadata: dict | None = None,
    ) -> InstanceInfo:
        self.server.add_handler(endpoint, handler, request_type=request_type, streaming=streaming)
        await self.server.start()
        info = InstanceInfo(
            namespace=namespace,
            component=component,
            endpoint=endpoint,
            instance_id=instance_id,
            host=self.advertise_host,
            port=self.server.port,
            metadata=metadata or {},
            registered_at=now(),
        )
        await self.discovery.register(info)
        self._registered.append(info)
        return info

    async def update_metadata(self, instance_id: int, metadata: dict) -> None:
        """Publish new ``metadata`` for every endpoint ``instance_id`` serves (what it offers
        changed while it runs: a worker loaded a LoRA adapter). Watchers see a ``put``."""
        for index, info in enumerate(self._registered):
            if info.instance_id == instance_id:
                info = msgspec.structs.replace(info, metadata=metadata)
                await self.discovery.register(info)
                self._registered[index] = info

    async def unregister_all(self) -> None:
        """Leave discovery (first step of a graceful shutdown: callers stop choosing us)."""
        for info in self._registered:
            with contextlib.suppress(Exception):
                await self.discovery.unregister(info)
        self._registered.clear()

    # -- clients -------------------------------------------------------------------------
    async def client(self, namespace: str, component: str, endpoint: str) -> EndpointClient:
        key = (namespace, component, endpoint)
        client = self._clients.get(key)
        if client is None:
            client = EndpointClient(self, namespace, component, endpoint)
            self._clients[key] = client
        await client.start()
        return client

    # -- events and queues ---------------------------------------------------------------
    async def nats_connection(self) -> NatsConnection:
        """This process's one NATS connection, opened on first use; it reconnects by itself."""
        async with self._nats_lock:
            if self._nats is None:
                if not self.nats_url:
                    raise RuntimeError(
                        f"no event plane: set {env.NATS_SERVER} (servegrid serve sets it for you)"
                    )
                from servegrid.distributed.nats_plane import connect_nats

                self._nats = await connect_nats(self.nats_url)
            return self._nats

    async def event_plane(self) -> EventPlane:
        connection = await self.nats_connection()
        if self._event_plane is None:  # no await between test and set: one plane only
            from servegrid.distributed.nats_plane import NatsEventPlane

            self._event_plane = NatsEventPlane(connection)
        return self._event_plane

    async def work_queue(self, namespace: str, name: str, **options: Any) -> WorkQueue:
        """The work queue ``name`` of ``namespace``; ``options`` go to ``NatsWorkQueue``
        (``ack_wait``: seconds a consumer may hold an item before it goes to another)."""
        from servegrid.distributed.nats_plane import NatsWorkQueue

        return NatsWorkQueue(await self.nats_connection(), f"{namespace}_{name}", **options)

    # -- lifecycle -----------------------------------------------------------------------
    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        await self.unregister_all()
        await self.server.drain(drain_timeout)
        await self.server.stop()
        for client in self._clients.values():
            await client.close()
        self.pool.close()
        if self._event_plane is not None:
            with contextlib.suppress(Exception):
                await self._event_plane.close()
        if self._nats is not None:
            with contextlib.suppress(Exception):
                await self._nats.close()
        await self.discovery.close()


class Namespace:
    def __init__(self, runtime: DistributedRuntime, name: str) -> None:
        self.runtime = runtime
        self.name = name

    def component(self, name: str) -> Component:
        return Component(self, name)

    async def publish(self, subject: str, payload: bytes) -> None:
        plane = await self.runtime.event_plane()
        await plane.publish(subject_for(self.name, subject), payload)

    async def subscribe(self, subject: str) -> Subscription:
        plane = await self.runtime.event_plane()
        return await plane.subscribe(subject_for(self.name, subject))

    async def work_queue(self, name: str, **options: Any) -> WorkQueue:
        return await self.runtime.work_queue(self.name, name, **options)


class Component:
    def __init__(self, namespace: Namespace, name: str) -> None:
        self.namespace = namespace
        self.name = name

    def endpoint(self, name: str) -> Endpoint:
        return Endpoint(self, name)


class Endpoint:
    def __init__(self, component: Component, name: str) -> None:
        self.component = component
        self.name = name

    @property
    def _runtime(self) -> DistributedRuntime:
        return self.component.namespace.runtime

    async def serve(
        self, handler: Handler, *, instance_id: int | None = None, request_type: Any = None
    ) -> InstanceInfo:
        return await self._runtime.serve_endpoint(
            self.component.namespace.name,
            self.component.name,
            self.name,
            handler,
            instance_id=instance_id if instance_id is not None else secrets.randbits(63),
            request_type=request_type,
        )

    async def client(self) -> EndpointClient:
        return await self._runtime.client(
            self.component.namespace.name, self.component.name, self.name
        )
