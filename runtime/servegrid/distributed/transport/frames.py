"""The request plane's wire format, defined once.

A connection opens with the handshake of ``handshake.py`` (the cluster secret, proven both
ways); only then do frames flow. Every frame is a 9-byte header followed by a body:

    u32 body length | u8 kind | u32 stream id      (big-endian)

Kinds:
    REQUEST   client → server  body: msgpack [endpoint name, payload]
    DATA      server → client  body: msgpack payload (one response item)
    LAST      server → client  body: msgpack payload, and the stream ends (saves an END frame
                               for single-response endpoints)
    END       server → client  body: empty; the stream ended normally
    ERROR     server → client  body: msgpack [code, message]; the stream ended in error
    CANCEL    client → server  body: empty; the caller went away, stop the work

Stream ids are chosen by the client. An id names one open stream of its connection: a REQUEST
that reuses the id of a stream still open (not yet ended, errored or cancelled) is a protocol
error, and so is any kind a client does not send or a body over ``MAX_FRAME_BODY``; the server
then closes the connection, which cancels every stream on it. Once a stream has ended or been
cancelled its id may be used again (the client's 32-bit counter wraps). A REQUEST beyond the
server's cap on open streams per connection is answered with an ERROR frame (code
``too_many_streams``); the connection and its other streams go on.

The client holds the server to the same rules: a body over ``MAX_FRAME_BODY``, a kind a server
does not send, a body that is not msgpack, or a frame left incomplete for ``READ_TIMEOUT``
closes the connection and fails its streams.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

import msgspec

HEADER = struct.Struct("!IBI")
HEADER_SIZE = HEADER.size
# Far above any request or response (a long prompt's ids are a few hundred KiB) and small
# enough that a peer cannot make the reader hold much for a frame it never finishes.
MAX_FRAME_BODY = 16 * 1024 * 1024
# Seconds either end gives a frame it has begun to receive (and the server, the handshake) to
# complete; a peer that stops mid-frame is disconnected rather than holding the reader's buffer.
READ_TIMEOUT = 15.0


class Kind(IntEnum):
    REQUEST = 1
    DATA = 2
    LAST = 3
    END = 4
    ERROR = 5
    CANCEL = 6


# The kinds as plain ints for the per-frame paths: reading an IntEnum member is a descriptor
# call that costs about as much as packing the frame's header.
REQUEST = int(Kind.REQUEST)
DATA = int(Kind.DATA)
LAST = int(Kind.LAST)
END = int(Kind.END)
ERROR = int(Kind.ERROR)
CANCEL = int(Kind.CANCEL)

_pack_header = HEADER.pack
encode_payload = msgspec.msgpack.Encoder().encode
decode_payload = msgspec.msgpack.Decoder().decode


class FrameTooLargeError(Exception):
    """A request or response is larger than one frame may be; the peer would drop the
    connection (and every stream on it) for it, so it is refused before it is sent."""


def frame(kind: int, stream_id: int, body: bytes = b"") -> bytes:
    size = len(body)
    if size > MAX_FRAME_BODY:
        what = "a request" if kind == REQUEST else "a response"
        raise FrameTooLargeError(
            f"{what} of {size} bytes exceeds the request plane's frame limit of "
            f"{MAX_FRAME_BODY} bytes"
        )
    return _pack_header(size, kind, stream_id) + body


class CoalescingWriter:
    """Frames sent in one event-loop iteration leave in one ``transport.write``.

    Mixed into both ends of a request-plane connection: many streams share it, and a step
    that answers many requests costs one syscall, not one per frame. ``_out_bytes`` counts
    what waits for the next write, so a writer can hold back before the buffer grows.
    """

    __slots__ = ()
    _loop: Any
    _transport: Any
    _out: list[bytes]
    _out_bytes: int
    _flush_scheduled: bool

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> bool:
        """Write what was queued in one call; False when nothing was written."""
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        transport = self._transport
        if not out or transport is None or transport.is_closing():
            return False
        transport.write(b"".join(out) if len(out) > 1 else out[0])
        return True


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; the connection is closed."""


class FrameReader:
    """Incremental frame parser: feed bytes, get complete (kind, stream_id, body) tuples.

    ``_buf`` holds the bytes of a frame begun but not complete (the server times it).
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        buf += data
        frames: list[tuple[int, int, bytes]] = []
        offset = 0
        end = len(buf)
        while end - offset >= HEADER_SIZE:
            length, kind, stream_id = HEADER.unpack_from(buf, offset)
            if length > MAX_FRAME_BODY:
                raise FrameError(f"frame body of {length} bytes exceeds {MAX_FRAME_BODY}")
            start = offset + HEADER_SIZE
            if end - start < length:
                break
            frames.append((kind, stream_id, bytes(buf[start : start + length])))
            offset = start + length
        if offset:
            del buf[:offset]
        return frames
