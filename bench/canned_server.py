"""A trivial OpenAI-compatible HTTP server that answers from templates, for measuring the client.

It does no inference and almost no work, so that a load generator pointed at it spends its time
in its own code: the tests use it to check the load generator's counts, and `bench/README.md`
uses it to measure how much CPU the load generator itself costs per request.

Serves, on HTTP/1.1 keep-alive: `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, both non-streaming and streaming (SSE over chunked encoding, one
content event per token, a usage event when `stream_options.include_usage` is set, then
`[DONE]`). `fail_every=k` answers every k-th completion request with a 500, to exercise error
accounting.

    python bench/canned_server.py --port 8900
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from dataclasses import dataclass, field

import msgspec

MODEL_ID = "canned-model"

_HEADER_END = b"\r\n\r\n"


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _CompletionRequest(msgspec.Struct):
    """The few request fields the canned answers depend on; the rest are ignored."""

    model: str = MODEL_ID
    max_tokens: int = 16
    stream: bool = False
    stream_options: _StreamOptions | None = None


_decode_request = msgspec.json.Decoder(_CompletionRequest).decode
_encode = msgspec.json.encode


@dataclass
class CannedServerStats:
    """What the server saw: lets a test check the client against the server's own count."""

    completions: int = 0
    streamed: int = 0
    failed: int = 0
    models: int = 0
    connections: int = 0
    paths: dict[str, int] = field(default_factory=dict)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_CHUNK_END = b"0\r\n\r\n"


class _CannedProtocol(asyncio.Protocol):
    def __init__(self, server: CannedServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        self.server.stats.connections += 1
        self.server._transports.add(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server._transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        # Several requests may sit in one read (a client may pipeline): answer each complete one.
        while True:
            end = self.buf.find(_HEADER_END)
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].decode()
            assert self.transport is not None
            self.server.handle(self.transport, method, path, body)


class CannedServer:
    """The server object: `await start()`, read `port`, `close()` when done."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        fail_every: int = 0,
        split_events: bool = False,
        omit_usage: bool = False,
        delay_s: float = 0.0,
        token_interval_s: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.fail_every = fail_every
        # Cut every SSE event across two HTTP chunks, to prove a client reassembles them.
        self.split_events = split_events
        # Never send a usage block, as some servers do not: the client must count tokens itself.
        self.omit_usage = omit_usage
        # Answer each completion this late, to pace the client like a real server would
        # (one wakeup per answer instead of many answers per wakeup).
        self.delay_s = delay_s
        # Space a stream's events out in time, so each arrives in its own read like real tokens.
        self.token_interval_s = token_interval_s
        self.stats = CannedServerStats()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _CannedProtocol(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Python 3.11's Server.wait_closed does not end open connections: end them here.
            for transport in list(self._transports):
                transport.abort()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def handle(self, transport: asyncio.Transport, method: bytes, path: str, body: bytes) -> None:
        stats = self.stats
        stats.paths[path] = stats.paths.get(path, 0) + 1
        if method == b"GET" and path == "/v1/models":
            stats.models += 1
            models = {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}
            transport.write(_response("200 OK", _encode(models)))
            return
        chat = path == "/v1/chat/completions"
        if method != b"POST" or not (chat or path == "/v1/completions"):
            err = {"error": {"message": f"no route {path}", "type": "not_found", "code": 404}}
            transport.write(_response("404 Not Found", _encode(err)))
            return
        stats.completions += 1
        if self.fail_every and stats.completions % self.fail_every == 0:
            stats.failed += 1
            err = {"error": {"message": "canned failure", "type": "server_error", "code": 500}}
            transport.write(_response("500 Internal Server Error", _encode(err)))
            return
        try:
            req = _decode_request(body)
        except msgspec.DecodeError as exc:
            err = {"error": {"message": str(exc), "type": "invalid_request_error", "code": 400}}
            transport.write(_response("400 Bad Request", _encode(err)))
            return
        n = max(1, req.max_tokens)
        if req.stream:
            stats.streamed += 1
            if self.token_interval_s > 0:
                self._stream_paced(transport, req, n, chat)
                return
            answer = b"".join(self._stream(req, n, chat))
        else:
            answer = _response("200 OK", _full_body(req, n, chat, not self.omit_usage))
        if self.delay_s > 0:
            asyncio.get_running_loop().call_later(self.delay_s, _write_open, transport, answer)
        else:
            transport.write(answer)

    def _stream_paced(
        self, transport: asyncio.Transport, req: _CompletionRequest, n: int, chat: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        head, *events = self._stream(req, n, chat)
        # The head goes with the first event, after the usual delay; then one event a tick.
        events[0] = head + events[0]
        for i, data in enumerate(events):
            loop.call_later(self.delay_s + i * self.token_interval_s, _write_open, transport, data)

    def _stream(self, req: _CompletionRequest, n: int, chat: bool) -> list[bytes]:
        """The response head, then one piece per SSE event; the last piece ends the body."""
        parts = [_STREAM_HEAD]
        obj = "chat.completion.chunk" if chat else "text_completion"
        events = []
        if chat:
            # Like real servers: a first chunk that carries only the role, no content.
            role = {"role": "assistant", "content": ""}
            events.append({"id": "c", "object": obj, "choices": [{"index": 0, "delta": role}]})
        for i in range(n):
            choice = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
            events.append({"id": "c", "object": obj, "model": req.model, "choices": [choice]})
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        if include_usage and not self.omit_usage:
            usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}
            events.append({"id": "c", "object": obj, "choices": [], "usage": usage})
        for ev in events:
            data = b"data: " + _encode(ev) + b"\n\n"
            if self.split_events:
                half = len(data) // 2
                parts.append(_chunk(data[:half]) + _chunk(data[half:]))
            else:
                parts.append(_chunk(data))
        parts.append(_chunk(b"data: [DONE]\n\n") + _CHUNK_END)
        return parts


def _write_open(transport: asyncio.Transport, data: bytes) -> None:
    if not transport.is_closing():
        transport.write(data)


def _full_body(req: _CompletionRequest, n: int, chat: bool, with_usage: bool) -> bytes:
    text = "".join(f" w{i}" for i in range(n))
    usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}
    if chat:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        obj = "text_completion"
    body: dict[str, object] = {"id": "c", "object": obj, "model": req.model, "choices": [choice]}
    if with_usage:
        body["usage"] = usage
    return _encode(body)


async def _serve(args: argparse.Namespace) -> None:
    server = CannedServer(
        args.host,
        args.port,
        fail_every=args.fail_every,
        delay_s=args.delay_ms / 1000,
        token_interval_s=args.token_interval_ms / 1000,
    )
    await server.start()
    print(f"canned server on {server.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--fail-every", type=int, default=0, help="500 every k-th completion")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="answer completions this late")
    parser.add_argument(
        "--token-interval-ms", type=float, default=0.0, help="space stream events this far apart"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
