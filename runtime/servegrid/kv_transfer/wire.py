"""The bulk path's frames and exchange, defined once for both ends.

One transfer per connection, in two steps, so that a receiver that will not take the KV
never has to read (or skip) its bytes:

    sender → receiver   header   (length-prefixed msgpack ``KvTransferHeader``)
    receiver → sender   reply    ok: send the segments; not ok: why, and the connection ends
    sender → receiver   the segments' raw bytes, in order (none for the mocker)
    receiver → sender   reply    ok: the KV is committed

A header that reports a failed prefill (``error``) gets one reply and carries no segments.
What a header may announce is bounded by the reservation it names (``check_header``).
"""

from __future__ import annotations

import asyncio
import struct
from typing import TypeVar

import msgspec

T = TypeVar("T")

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20
MAX_SEGMENTS = 1 << 16  # e.g. K and V of 128 layers for 256 blocks each
READ_CHUNK = 1 << 20


class KvTarget(msgspec.Struct, frozen=True):
    """Where a prefill worker writes a prompt's KV: carried in the prefill queue item."""

    host: str
    port: int
    transfer_id: str
    first_token: int  # tokens before this are in the decode worker's cache already
    num_tokens: int  # the KV to send ends here (prompt length - 1)
    block_ids: list[int] = []  # the decode worker's reserved blocks, for engines that need them


class KvTransferHeader(msgspec.Struct, omit_defaults=True):
    transfer_id: str
    first_token: int
    num_tokens: int
    segment_sizes: list[int] = []  # raw bytes that follow the header, in this order
    logical_bytes: int = 0  # the KV's size on a real link (the mocker ships none of it)
    error: str | None = None  # the prefill failed: the decode worker prefills locally at once


class KvTransferReply(msgspec.Struct, omit_defaults=True):
    ok: bool
    error: str | None = None


class KvFrameError(ValueError):
    """Bytes on the bulk path that are not a well-formed frame of this protocol."""


def check_header(
    header: KvTransferHeader, first_token: int, num_tokens: int, allowed_bytes: int
) -> str | None:
    """Why ``header`` cannot fill a reservation of tokens ``[first_token, num_tokens)`` that
    takes at most ``allowed_bytes`` (``kv_transfer_limit``); None when it can."""
    if (header.first_token, header.num_tokens) != (first_token, num_tokens):
        return (
            f"tokens [{header.first_token}, {header.num_tokens}) were sent, "
            f"[{first_token}, {num_tokens}) were reserved"
        )
    sizes = header.segment_sizes
    if len(sizes) > MAX_SEGMENTS:
        return f"{len(sizes)} segments announced; at most {MAX_SEGMENTS} are taken"
    if any(size < 0 for size in sizes):
        return "a negative segment size was announced"
    total = sum(sizes)
    if total > allowed_bytes or not 0 <= header.logical_bytes <= allowed_bytes:
        return (
            f"{max(total, header.logical_bytes)} bytes announced for tokens "
            f"[{first_token}, {num_tokens}), whose reservation takes at most {allowed_bytes}"
        )
    return None


_encoder = msgspec.msgpack.Encoder()


def encode_frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, kind: type[T]) -> T | None:
    """The next frame decoded as ``kind``; None at a clean end of stream.

    Raises ``KvFrameError`` for an oversized or undecodable frame and
    ``asyncio.IncompleteReadError`` for one cut off. Callers bound the wait.
    """
    try:
        prefix = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (size,) = _LEN.unpack(prefix)
    if size > MAX_HEADER_BYTES:
        raise KvFrameError(f"a frame of {size} bytes announced; at most {MAX_HEADER_BYTES}")
    body = await reader.readexactly(size)
    try:
        return msgspec.msgpack.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise KvFrameError(f"not a {kind.__name__}: {exc}") from None


async def read_into(reader: asyncio.StreamReader, buffer: memoryview, stall_timeout: float) -> None:
    """Fill ``buffer`` from ``reader``; TimeoutError when no byte comes for ``stall_timeout``."""
    filled, size = 0, len(buffer)
    while filled < size:
        async with asyncio.timeout(stall_timeout):
            chunk = await reader.read(min(size - filled, READ_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", size - filled)
        buffer[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
