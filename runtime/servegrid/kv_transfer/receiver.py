"""The decode worker's end of the bulk path: a listener that fills reserved KV blocks.

Every connection opens with the request plane's handshake (``transport/handshake.py``): with
the cluster secret set, only a process that holds it can write into this worker's cache, and
the listener refuses to start beyond loopback without one, as the request plane does.

What a peer can make it hold is bounded: at most ``max_connections`` connections at once
(more are closed as they arrive), one transfer a connection, the handshake and then the
header each within ``read_timeout``, no pause longer than ``read_timeout`` while the segments
arrive, and no more bytes than the reservation's KV is long (``engine.kv_transfer_limit``,
from the model's config). A transfer nobody expects is refused before any of its bytes are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from dataclasses import dataclass

from servegrid.distributed.secret import require_secret_for_bind
from servegrid.distributed.transport import handshake
from servegrid.engines.disagg import KvReservation, KvTransferEngine
from servegrid.kv_transfer.wire import (
    KvFrameError,
    KvTarget,
    KvTransferHeader,
    KvTransferReply,
    check_header,
    encode_frame,
    read_frame,
    read_into,
)

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 256

_READY = KvTransferReply(True)


class RemotePrefillFailedError(RuntimeError):
    """The KV did not arrive: the prefill worker failed, or its transfer was bad or cut off."""


@dataclass(eq=False)
class _Pending:
    reservation: KvReservation
    done: asyncio.Future[None]
    deadline: float | None  # loop time after which the decode request gives up waiting


class KvReceiver:
    """Accepts KV transfers for reservations announced with ``expect``.

    A transfer nobody expects (its decode request gave up at its deadline, or it was already
    received) is refused, so a late or duplicate prefill never writes into blocks reused since.
    """

    def __init__(
        self,
        engine: KvTransferEngine,
        bind_host: str,
        advertise_host: str,
        port: int = 0,
        *,
        secret: str | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.engine = engine
        self._secret = secret.encode("ascii") if secret is not None else None
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.port = port
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._pending: dict[str, _Pending] = {}
        self._receiving: dict[str, _Pending] = {}  # headers taken, bytes arriving
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.transfers_received = 0
        self.bytes_received = 0
        self.logical_bytes_received = 0
        self.refused = 0  # transfers refused: unexpected, or not what the reservation allows
        self.connections_refused = 0  # over max_connections
        self.connections_dropped = 0  # timed out, cut off, or not this protocol
        self.refused_connections = 0  # failed the handshake (no secret, or another one)

    async def start(self) -> None:
        if self._server is not None:
            return
        require_secret_for_bind(self.bind_host, self._secret is not None)
        self._server = await asyncio.start_server(self._serve, self.bind_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("KV transfer listener on %s:%d", self.bind_host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._connections):
            # Aborted, not cancelled: each handler ends on its own (a cancelled handler task
            # is reported as an error by asyncio's stream server on Python 3.11).
            writer.transport.abort()
        for pending in [*self._pending.values(), *self._receiving.values()]:
            _fail(pending, "the worker is stopping")
        self._pending.clear()
        self._receiving.clear()

    def expect(
        self, reservation: KvReservation, timeout: float | None = None
    ) -> tuple[KvTarget, asyncio.Future[None]]:
        """Announce a reservation; the future completes when its KV is committed.

        ``timeout``: how long the caller waits for it; a transfer still arriving then gets
        ``read_timeout`` more, and is cut off after that (the future fails).
        """
        transfer_id = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        deadline = loop.time() + timeout if timeout is not None else None
        self._pending[transfer_id] = _Pending(reservation, done, deadline)
        target = KvTarget(
            host=self.advertise_host,
            port=self.port,
            transfer_id=transfer_id,
            first_token=reservation.first_token,
            num_tokens=reservation.num_tokens,
            block_ids=reservation.block_ids,
        )
        return target, done

    def withdraw(self, transfer_id: str) -> bool:
        """Stop expecting a transfer. False when it is already being written (await it)."""
        return self._pending.pop(transfer_id, None) is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._connections) >= self.max_connections:
            self.connections_refused += 1
            if self.connections_refused == 1 or self.connections_refused % 1000 == 0:
                log.warning(
                    "KV transfer listener: %d connections open, the most it takes; closing "
                    "the one from %s (%d refused so far)",
                    len(self._connections),
                    peer,
                    self.connections_refused,
                )
            writer.transport.abort()
            return
        self._connections.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    await handshake.accept_stream(reader, writer, self._secret)
            except handshake.HandshakeRefusedError as exc:
                self.refused_connections += 1
                log.warning("KV transfer connection from %s refused: %s", peer, exc)
                return
            async with asyncio.timeout(self.read_timeout):
                header = await read_frame(reader, KvTransferHeader)
            if header is None:
                return
            reply = await self._receive(header, reader, writer)
            writer.write(encode_frame(reply))
            async with asyncio.timeout(self.read_timeout):
                await writer.drain()
        except TimeoutError:
            self.connections_dropped += 1
            log.warning(
                "KV transfer from %s: nothing arrived for %.0fs; connection closed",
                peer,
                self.read_timeout,
            )
        except (asyncio.IncompleteReadError, ConnectionError, KvFrameError) as exc:
            self.connections_dropped += 1
            log.warning("KV transfer from %s dropped: %s", peer, exc or type(exc).__name__)
        finally:
            self._connections.discard(writer)
            writer.close()  # one transfer a connection

    async def _receive(
        self,
        header: KvTransferHeader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> KvTransferReply:
        transfer_id = header.transfer_id
        pending = self._pending.get(transfer_id)
        if pending is None:
            self.refused += 1
            return KvTransferReply(
                False, f"no transfer {transfer_id} is expected (the decode worker gave up)"
            )
        del self._pending[transfer_id]
        if header.error is not None:
            _fail(pending, header.error)
            return KvTransferReply(True)
        reservation = pending.reservation
        allowed = self.engine.kv_transfer_limit(reservation)
        problem = check_header(header, reservation.first_token, reservation.num_tokens, allowed)
        if problem is not None:
            # A sender that cannot fill this reservation: prefill locally at once.
            self.refused += 1
            _fail(pending, problem)
            return KvTransferReply(False, problem)
        self._receiving[transfer_id] = pending
        try:
            buffers = self.engine.kv_buffers(reservation, header.segment_sizes)
        except Exception as exc:
            self._receiving.pop(transfer_id, None)
            _fail(pending, f"{type(exc).__name__}: {exc}")
            return KvTransferReply(False, str(exc))
        try:
            writer.write(encode_frame(_READY))
            loop = asyncio.get_running_loop()
            cutoff = max(pending.deadline or loop.time(), loop.time()) + self.read_timeout
            async with asyncio.timeout_at(cutoff):
                for buffer in buffers:
                    # Into the engine's buffer as it arrives (a real engine's pinned memory).
                    await read_into(reader, buffer, self.read_timeout)
            self.engine.commit_kv(reservation)
        except TimeoutError:
            _fail(pending, "the transfer stalled")
            raise
        except (asyncio.IncompleteReadError, ConnectionError):
            _fail(pending, "the transfer was cut off")
            raise
        except BaseException as exc:  # the engine refused the bytes, or the worker stops
            _fail(pending, f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, Exception):
                raise
            return KvTransferReply(False, str(exc))
        finally:
            self._receiving.pop(transfer_id, None)
        self.transfers_received += 1
        self.bytes_received += sum(header.segment_sizes)
        self.logical_bytes_received += header.logical_bytes
        if not pending.done.done():
            pending.done.set_result(None)
        return KvTransferReply(True)


def _fail(pending: _Pending, reason: str) -> None:
    if not pending.done.done():
        pending.done.set_exception(RemotePrefillFailedError(reason))
