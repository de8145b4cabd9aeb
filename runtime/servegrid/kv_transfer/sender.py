"""The prefill worker's end of the bulk path: ship a computed KV cache to its decode worker."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from servegrid.distributed.secret import load_cluster_secret
from servegrid.distributed.transport import handshake
from servegrid.engines.disagg import PrefilledKv
from servegrid.kv_transfer.wire import (
    KvTarget,
    KvTransferHeader,
    KvTransferReply,
    encode_frame,
    read_frame,
)

DEFAULT_TIMEOUT_S = 30.0


class KvTransferRefusedError(RuntimeError):
    """The decode worker did not take the KV (it gave up on the request, or is gone)."""


async def send_kv(
    target: KvTarget,
    kv: PrefilledKv | None,
    *,
    error: str | None = None,
    bandwidth_bytes_per_s: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Send ``kv`` to ``target`` (or ``error``: the prefill failed); return once committed.

    The connection opens with the request plane's handshake, with the cluster secret from the
    environment. Bytes an engine does not ship for real (the mocker ships none) take the time
    a link of ``bandwidth_bytes_per_s`` would need for them. Raises ``KvTransferRefusedError``.
    """
    if kv is None:
        header = KvTransferHeader(
            target.transfer_id, target.first_token, target.num_tokens, error=error or "failed"
        )
        segments: list[memoryview] = []
    else:
        segments = kv.segments
        header = KvTransferHeader(
            target.transfer_id,
            kv.first_token,
            kv.num_tokens,
            segment_sizes=[len(s) for s in segments],
            logical_bytes=kv.logical_bytes,
        )
        simulated = kv.logical_bytes - sum(header.segment_sizes)
        if simulated > 0 and bandwidth_bytes_per_s > 0:
            await asyncio.sleep(simulated / bandwidth_bytes_per_s)
    loaded = load_cluster_secret()
    secret = loaded.encode("ascii") if loaded is not None else None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            try:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                where = f"the KV listener at {target.host}:{target.port}"
                await handshake.connect_stream(reader, writer, secret, where)
                writer.write(encode_frame(header))
                for segment in segments:
                    writer.write(segment)
                await writer.drain()
                reply = await read_frame(reader, KvTransferReply)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except handshake.HandshakeRefusedError as exc:
        raise KvTransferRefusedError(str(exc)) from None
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise KvTransferRefusedError(
            f"decode worker at {target.host}:{target.port} unreachable ({type(exc).__name__})"
        ) from exc
    if reply is None or not reply.ok:
        reason = reply.error if reply is not None else "closed without a reply"
        raise KvTransferRefusedError(f"decode worker at {target.host}:{target.port}: {reason}")
