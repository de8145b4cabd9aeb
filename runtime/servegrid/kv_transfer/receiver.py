"""The decode worker's end of the bulk path: a listener that fills reserved KV blocks."""

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
    KvTarget,
    KvTransferHeader,
    KvTransferReply,
    encode_frame,
    read_frame,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 15.0


class RemotePrefillFailedError(RuntimeError):
    """The prefill worker reported that it could not compute the KV."""


@dataclass(eq=False)
class _Pending:
    reservation: KvReservation
    done: asyncio.Future[None]


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
    ) -> None:
        self.engine = engine
        # Every connection opens with the request plane's handshake (the cluster secret).
        self._secret = secret.encode("ascii") if secret is not None else None
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.port = port
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.transfers_received = 0
        self.bytes_received = 0
        self.logical_bytes_received = 0
        self.refused = 0
        self.refused_connections = 0  # failed the handshake

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
        for task in list(self._connections):
            task.cancel()
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.set_exception(RemotePrefillFailedError("the worker is stopping"))
        self._pending.clear()

    def expect(self, reservation: KvReservation) -> tuple[KvTarget, asyncio.Future[None]]:
        """Announce a reservation; the future completes when its KV is committed."""
        transfer_id = secrets.token_hex(8)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[transfer_id] = _Pending(reservation, done)
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    await handshake.accept_stream(reader, writer, self._secret)
            except (handshake.HandshakeRefusedError, TimeoutError) as exc:
                self.refused_connections += 1
                log.warning("KV transfer connection refused: %s", exc or "no handshake in time")
                return
            while True:
                header = await read_frame(reader, KvTransferHeader)
                if header is None:
                    return
                reply = await self._receive(header, reader)
                writer.write(encode_frame(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            log.warning("KV transfer connection dropped: %s", exc)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _receive(
        self, header: KvTransferHeader, reader: asyncio.StreamReader
    ) -> KvTransferReply:
        pending = self._pending.pop(header.transfer_id, None)
        if pending is None:
            self.refused += 1
            await _skip(reader, sum(header.segment_sizes))
            return KvTransferReply(
                False, f"no transfer {header.transfer_id} is expected (the decode worker gave up)"
            )
        if header.error is not None:
            pending.done.set_exception(RemotePrefillFailedError(header.error))
            return KvTransferReply(True)
        reservation = pending.reservation
        try:
            if (header.first_token, header.num_tokens) != (
                reservation.first_token,
                reservation.num_tokens,
            ):
                raise ValueError(
                    f"tokens [{header.first_token}, {header.num_tokens}) were sent, "
                    f"[{reservation.first_token}, {reservation.num_tokens}) were reserved"
                )
            buffers = self.engine.kv_buffers(reservation, header.segment_sizes)
            for buffer in buffers:
                # Into the engine's buffer as it arrives (a real engine's pinned memory).
                buffer[:] = await reader.readexactly(len(buffer))
            self.engine.commit_kv(reservation)
        except asyncio.IncompleteReadError as exc:
            pending.done.set_exception(RemotePrefillFailedError("the transfer was cut off"))
            raise exc
        except Exception as exc:
            pending.done.set_exception(RemotePrefillFailedError(f"{type(exc).__name__}: {exc}"))
            return KvTransferReply(False, str(exc))
        self.transfers_received += 1
        self.bytes_received += sum(header.segment_sizes)
        self.logical_bytes_received += header.logical_bytes
        if not pending.done.done():
            pending.done.set_result(None)
        return KvTransferReply(True)


async def _skip(reader: asyncio.StreamReader, size: int) -> None:
    while size > 0:
        chunk = await reader.read(min(size, 1 << 20))
        if not chunk:
            return
        size -= len(chunk)
