"""The NATS event plane and the JetStream work queue.

A process opens one connection (``connect_nats``) and shares it between its event plane and
its work queues. The connection reconnects forever: a NATS restart costs the events published
while it was down (the event plane is fire-and-forget) and nothing else. Subscriptions are
resent by the client on reconnect, and work-queue items live in a file-backed stream, so
queued work survives the restart.

The work queue is a stream with work-queue retention and one durable pull consumer that every
consumer process shares: each item goes to exactly one of them, is removed when acked after
the work is done, and is redelivered after ``ack_wait`` when its consumer died first.

Credentials: a ``NATS_SERVER`` URL that carries its own (``nats://user:pass@host:4222``) is used
as it is; otherwise, when the cluster secret is set (``secret.py``), the client authenticates as
user ``servegrid`` with the secret as its password: how the deploy role, and the private
nats-server of ``servegrid serve``, configure the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsRawSubscription
from nats.js import api as js_api
from nats.js.client import JetStreamContext

from servegrid.distributed import env
from servegrid.distributed.events import EventPlane, Subscription, WorkItem, WorkQueue
from servegrid.distributed.secret import HOW_TO_SET, NATS_USER, load_cluster_secret

log = logging.getLogger(__name__)

DEFAULT_PORT = 4222
RECONNECT_WAIT = 1.0
DEFAULT_ACK_WAIT = 30.0
WORK_QUEUE_SUBJECT_ROOT = "servegrid.workqueue"
WORK_QUEUE_CONSUMER = "workers"


class NatsUnavailableError(ConnectionError):
    """NATS could not be reached."""


def normalize_url(url: str) -> str:
    """``nats://host:port`` from a URL or a bare ``host:port``."""
    url = url.strip()
    if "://" not in url:
        url = f"nats://{url}"
    return url


class NatsConnection:
    """One NATS connection of a process, shared by its event plane and work queues."""

    def __init__(self, client: NatsClient, url: str) -> None:
        self.client = client
        self.url = url
        self.jetstream = client.jetstream()
        self._connected = asyncio.Event()
        self._connected.set()
        self._reconnected = asyncio.Condition()
        self.reconnects = 0
        self.closing = False

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the connection is up (again); ``TimeoutError`` after ``timeout``."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def wait_reconnects(self, count: int, timeout: float) -> None:
        """Wait until the connection has been restored ``count`` times in all."""

        async def until() -> None:
            async with self._reconnected:
                await self._reconnected.wait_for(lambda: self.reconnects >= count)

        await asyncio.wait_for(until(), timeout)

    async def _on_reconnected(self) -> None:
        self._connected.set()
        async with self._reconnected:
            self.reconnects += 1
            self._reconnected.notify_all()

    def event_plane(self) -> NatsEventPlane:
        return NatsEventPlane(self)

    def work_queue(self, name: str, **options) -> NatsWorkQueue:
        return NatsWorkQueue(self, name, **options)

    async def close(self) -> None:
        if self.client.is_closed:
            return
        self.closing = True
        # Flush what was published, then close. Not drain(): it waits up to 30 s for every
        # subscription's unread messages, and a work queue's pull subscription may hold an
        # item nobody will read (it is redelivered after ack_wait).
        with contextlib.suppress(Exception):
            await self.client.flush(timeout=2)
        if not self.client.is_closed:
            await self.client.close()


async def connect_nats(
    url: str | None = None, *, name: str | None = None, connect_timeout: float = 10.0
) -> NatsConnection:
    """Connect to NATS (``url`` or ``NATS_SERVER``), reconnecting forever once connected.

    The first connection must succeed within ``connect_timeout`` seconds, else
    ``NatsUnavailableError`` says where it looked.
    """
    raw = url or os.environ.get(env.NATS_SERVER, "")
    if not raw:
        raise NatsUnavailableError(f"no NATS server given; set {env.NATS_SERVER}=nats://HOST:4222")
    server = normalize_url(raw)
    credentials = nats_credentials(server)
    shown = redact(server)
    connection: NatsConnection | None = None

    async def on_disconnected() -> None:
        if connection is not None:
            connection._connected.clear()
            if connection.closing:
                return
        log.warning("NATS connection to %s lost; reconnecting", shown)

    async def on_reconnected() -> None:
        if connection is not None:
            await connection._on_reconnected()
        log.warning("NATS connection to %s restored", shown)

    # The client retries a refused login until the timeout; the first refusal ends the wait.
    refused = asyncio.get_running_loop().create_future()

    async def on_error(error: Exception) -> None:
        # The client reports every failed reconnect attempt; one line each, no traceback.
        log.debug("NATS %s: %s", shown, error)
        if connection is None and "authorization" in str(error).lower() and not refused.done():
            refused.set_result(None)

    client = NatsClient()
    connecting = asyncio.ensure_future(
        asyncio.wait_for(
            client.connect(
                servers=[server],
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=RECONNECT_WAIT,
                connect_timeout=min(2.0, connect_timeout),
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                error_cb=on_error,
                **credentials,
            ),
            connect_timeout,
        )
    )
    try:
        await asyncio.wait([connecting, refused], return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
            await client.close()
            raise NatsUnavailableError(_refused_message(server, credentials))
        connecting.result()
    except (nats.errors.AuthorizationError, NatsUnavailableError):
        with contextlib.suppress(Exception):
            await client.close()
        raise NatsUnavailableError(_refused_message(server, credentials)) from None
    except (TimeoutError, OSError, nats.errors.Error) as error:
        with contextlib.suppress(Exception):
            await client.close()
        raise NatsUnavailableError(
            f"cannot reach NATS at {shown} within {connect_timeout:g}s ({type(error).__name__}); "
            f"check that nats-server runs there and that {env.NATS_SERVER} is right"
        ) from error
    connection = NatsConnection(client, server)
    return connection


def nats_credentials(url: str) -> dict[str, str]:
    """``user``/``password`` for the client: none when the URL has its own or no cluster
    secret is set, else user ``servegrid`` with the secret."""
    if urlsplit(url).username is not None:
        return {}
    secret = load_cluster_secret()
    if secret is None:
        return {}
    return {"user": NATS_USER, "password": secret}


def redact(url: str) -> str:
    """The URL without user and password, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def _refused_message(server: str, credentials: dict[str, str]) -> str:
    shown = redact(server)
    if urlsplit(server).username is not None:
        return f"NATS at {shown} refused the credentials in {env.NATS_SERVER}; check them"
    if credentials:
        return (
            f"NATS at {shown} refused user {NATS_USER!r} with this process's cluster secret: the "
            f"server was configured with another secret. Give every node the same "
            f"{env.SERVEGRID_CLUSTER_SECRET_FILE} (or {env.SERVEGRID_CLUSTER_SECRET}), or put "
            f"credentials in {env.NATS_SERVER}=nats://USER:PASSWORD@HOST:PORT"
        )
    return (
        f"NATS at {shown} requires credentials and this process has none; {HOW_TO_SET} (the "
        f"client then logs in as {NATS_USER!r} with it), or put credentials in "
        f"{env.NATS_SERVER}=nats://USER:PASSWORD@HOST:PORT"
    )


class NatsSubscription(Subscription):
    """Payloads of one NATS subscription."""

    def __init__(self, sub: NatsRawSubscription, owner: NatsEventPlane) -> None:
        self._sub = sub
        self._owner = owner
        self._closed = False

    async def _payloads(self) -> AsyncIterator[bytes]:
        try:
            async for msg in self._sub.messages:
                yield msg.data
        except nats.errors.ConnectionClosedError:
            return

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._payloads()

    async def unsubscribe(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._subscriptions.discard(self)
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()


class NatsEventPlane(EventPlane):
    """Fire-and-forget pub/sub over a shared connection.

    ``close`` ends this plane's subscriptions; the connection belongs to its
    ``NatsConnection`` and is closed there.
    """

    def __init__(self, connection: NatsConnection) -> None:
        self.connection = connection
        self._subscriptions: set[NatsSubscription] = set()

    async def publish(self, subject: str, payload: bytes) -> None:
        # While reconnecting the client buffers publishes and sends them once back.
        await self.connection.client.publish(subject, payload)

    async def subscribe(self, subject: str) -> Subscription:
        sub = await self.connection.client.subscribe(subject)
        subscription = NatsSubscription(sub, self)
        self._subscriptions.add(subscription)
        return subscription

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the server has processed everything sent so far."""
        await self.connection.client.flush(timeout)

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.unsubscribe()


class NatsWorkItem(WorkItem):
    """One item taken from the queue; ack it after the work is done."""

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.data = msg.data

    @property
    def deliveries(self) -> int:
        """How many times this item was handed out, this time included."""
        return self._msg.metadata.num_delivered

    async def ack(self) -> None:
        try:
            await self._msg.ack_sync(timeout=5.0)
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as error:
            # The item may come back once more: delivery is at-least-once.
            log.warning("work item ack not confirmed (%s); it may be redelivered", error)

    async def nak(self, delay: float = 0.0) -> None:
        await self._msg.nak(delay=delay if delay > 0 else None)

    async def in_progress(self) -> None:
        """Restart this item's ``ack_wait`` timer: the work is long, not dead."""
        await self._msg.in_progress()


def _stream_name(name: str) -> str:
    # Stream names may not contain whitespace, '.', '*', '>' or path separators.
    return "SG_" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


class NatsWorkQueue(WorkQueue):
    """A JetStream work queue: at-least-once delivery of each item to one consumer.

    ``ack_wait`` is how long a consumer may hold an item without acking before it goes to
    another consumer (``NatsWorkItem.in_progress`` extends it). The stream and the shared
    durable consumer are created on first use; ``ack_wait`` is updated when it differs.
    A producer that should not decide it (the consumers own it) passes ``ack_wait=None``:
    an existing consumer keeps its value, a new one gets the default.
    """

    def __init__(
        self,
        connection: NatsConnection,
        name: str,
        *,
        ack_wait: float | None = DEFAULT_ACK_WAIT,
        max_deliver: int | None = None,
        request_timeout: float = 5.0,
    ) -> None:
        self.connection = connection
        self.name = name
        self.stream = _stream_name(name)
        self.subject = f"{WORK_QUEUE_SUBJECT_ROOT}.{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.request_timeout = request_timeout
        self._pull: JetStreamContext.PullSubscription | None = None
        self._setup_lock = asyncio.Lock()

    @property
    def _js(self):
        return self.connection.jetstream

    async def start(self) -> None:
        """Create (or find) the stream and the shared consumer. Idempotent."""
        async with self._setup_lock:
            if self._pull is not None:
                return
            await self._ensure_stream()
            await self._ensure_consumer()
            self._pull = await self._js.pull_subscribe_bind(
                consumer=WORK_QUEUE_CONSUMER, stream=self.stream
            )

    async def _ensure_stream(self) -> None:
        try:
            await self._js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        config = js_api.StreamConfig(
            name=self.stream,
            subjects=[self.subject],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            # File storage: queued items survive a server restart.
            storage=js_api.StorageType.FILE,
            num_replicas=1,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # Another process created it first with the same name.
            await self._js.stream_info(self.stream)

    async def _ensure_consumer(self) -> None:
        config = js_api.ConsumerConfig(
            durable_name=WORK_QUEUE_CONSUMER,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait if self.ack_wait is not None else DEFAULT_ACK_WAIT,
            max_deliver=self.max_deliver,
            filter_subject=self.subject,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )
        try:
            info = await self._js.consumer_info(self.stream, WORK_QUEUE_CONSUMER)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and self.ack_wait in (None, info.config.ack_wait):
            return
        await self._js.add_consumer(self.stream, config)

    async def _reset(self) -> None:
        """Forget the pull subscription so the next call sets everything up again (the
        server may have lost the stream, e.g. a private server restarted without its store)."""
        async with self._setup_lock:
            pull, self._pull = self._pull, None
        if pull is not None:
            with contextlib.suppress(Exception):
                await pull.unsubscribe()

    async def enqueue(self, data: bytes) -> None:
        """Add an item; returns once the server has stored it.

        Retries while the server is unreachable, up to ``request_timeout`` seconds a try and
        three tries, then raises ``NatsUnavailableError``.
        """
        await self.start()
        last_error: Exception | None = None
        for _ in range(3):
            try:
                await self._js.publish(
                    self.subject, data, stream=self.stream, timeout=self.request_timeout
                )
                return
            except nats.js.errors.NotFoundError as error:
                last_error = error
                await self._reset()
                await self.start()
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
                last_error = error
                await asyncio.sleep(RECONNECT_WAIT)
        raise NatsUnavailableError(
            f"work queue {self.name!r}: NATS at {self.connection.url} did not store the item "
            f"({type(last_error).__name__}); is the server up?"
        )

    async def dequeue(self, timeout: float = 1.0) -> NatsWorkItem | None:
        await self.start()
        assert self._pull is not None
        try:
            msgs = await self._pull.fetch(1, timeout=timeout)
        except nats.errors.TimeoutError:
            return None
        except nats.js.errors.NotFoundError:
            await self._reset()
            return None
        except nats.js.errors.APIError as error:
            # e.g. 409 "consumer deleted" after the server lost its store.
            log.warning("work queue %r: %s; setting the consumer up again", self.name, error)
            await self._reset()
            return None
        return NatsWorkItem(msgs[0]) if msgs else None

    async def depth(self) -> int:
        """Items no consumer has taken yet (the consumer's ``num_pending``).

        Items handed out and not yet acked (``num_ack_pending``) are not counted: JetStream
        does not tell an item being worked on from one whose consumer died and that waits
        for ``ack_wait`` to run out. For the prefill queue "how much work has nobody started"
        is the load signal wanted.
        """
        await self.start()
        info = await self._js.consumer_info(
            self.stream, WORK_QUEUE_CONSUMER, timeout=self.request_timeout
        )
        return info.num_pending or 0

    async def in_flight(self) -> int:
        """Items handed out and not acked yet (being worked on, or awaiting redelivery)."""
        await self.start()
        info = await self._js.consumer_info(
            self.stream, WORK_QUEUE_CONSUMER, timeout=self.request_timeout
        )
        return info.num_ack_pending or 0

    async def close(self) -> None:
        await self._reset()
