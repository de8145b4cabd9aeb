"""The bulk path's frames: a length-prefixed msgpack header, raw segment bytes, a reply."""

from __future__ import annotations

import asyncio
import struct
from typing import TypeVar

import msgspec

T = TypeVar("T")

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20


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


_encoder = msgspec.msgpack.Encoder()


def encode_frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, kind: type[T]) -> T | None:
    """The next frame decoded as ``kind``; None at a clean end of stream."""
    try:
        prefix = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (size,) = _LEN.unpack(prefix)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"KV transfer frame of {size} bytes is larger than {MAX_HEADER_BYTES}")
    return msgspec.msgpack.decode(await reader.readexactly(size), type=kind)
