"""HTTP/1.1 behaviour of ``OpenAIHttpServer`` on raw sockets: keep-alive, pipelining, request
bodies, limits, disconnects, backpressure and graceful stop."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from servegrid.http import OpenAIHttpServer
from servegrid.http.limits import HttpLimits
from servegrid.llm.protocol import GenerateChunk, TextRequest

MODEL = "tiny"
BIG_CHUNK = 64 * 1024
BIG_CHUNKS = 800  # 50 MiB: far more than loopback socket buffers hold


class ControlledFrontend:
    """The prompt says what to do: answer at once, wait for ``release``, hang, or flood."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.produced = 0

    def models(self) -> list[str]:
        return [MODEL]

    async def generate(self, request: TextRequest):
        try:
            self.started.set()
            if request.prompt == "hang":
                yield GenerateChunk(text="first", completion_tokens=1, prompt_tokens=1)
                await asyncio.Event().wait()  # until the request is abandoned
            elif request.prompt == "hang-before-first":
                await asyncio.Event().wait()
            elif request.prompt == "wait":
                await self.release.wait()
                yield GenerateChunk(text="released", completion_tokens=1, finish_reason="stop")
            elif request.prompt == "flood":
                for i in range(BIG_CHUNKS):
                    self.produced = i + 1
                    yield GenerateChunk(text="x" * BIG_CHUNK, completion_tokens=i + 1)
                yield GenerateChunk(text="", completion_tokens=BIG_CHUNKS, finish_reason="stop")
            else:
                yield GenerateChunk(
                    text=f"answer-{request.max_tokens}", completion_tokens=1, finish_reason="stop"
                )
        finally:
            self.closed.set()


@pytest.fixture
async def frontend():
    return ControlledFrontend()


@pytest.fixture
async def server(frontend):
    srv = OpenAIHttpServer(frontend, "127.0.0.1", 0, limits=HttpLimits(max_body_bytes=4096))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(timeout_s=5)


def completion_request(
    max_tokens: int = 1, prompt: str = "hi", stream: bool = False, extra_headers: str = ""
) -> bytes:
    body = json.dumps(
        {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    ).encode()
    return (
        f"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        f"{extra_headers}content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    headers = {k.lower(): v for k, v in headers.items()}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, headers, body


async def connect(server: OpenAIHttpServer):
    return await asyncio.open_connection("127.0.0.1", server.port)


async def closes(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


async def test_many_sequential_requests_share_one_keepalive_connection(server):
    reader, writer = await connect(server)
    try:
        for i in range(1, 201):
            writer.write(completion_request(max_tokens=i))
            status, headers, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200
            assert "connection" not in headers
            assert json.loads(body)["choices"][0]["text"] == f"answer-{i}"
        assert server.connection_count == 1
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(server):
    reader, writer = await connect(server)
    try:
        batch = []
        for i in range(1, 41):  # more than the pipelining queue holds before reading pauses
            batch.append(completion_request(max_tokens=i))
            if i % 10 == 0:
                batch.append(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        writer.write(b"".join(batch))
        for i in range(1, 41):
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert (status, json.loads(body)["choices"][0]["text"]) == (200, f"answer-{i}")
            if i % 10 == 0:
                status, _, body = await asyncio.wait_for(read_response(reader), 5)
                assert (status, json.loads(body)["status"]) == (200, "ok")
    finally:
        writer.close()


async def test_chunked_request_body_is_accepted(server):
    reader, writer = await connect(server)
    try:
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 7}).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for piece in (body[:10], body[10:20], body[20:]):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        status, _, resp = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200 and json.loads(resp)["choices"][0]["text"] == "answer-7"
    finally:
        writer.close()


async def test_expect_100_continue(server):
    reader, writer = await connect(server)
    try:
        writer.write(completion_request(extra_headers="expect: 100-continue\r\n"))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        status, _, _ = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200
    finally:
        writer.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_limit_is_413_and_server_keeps_serving(server, chunked):
    reader, writer = await connect(server)
    try:
        payload = b"x" * 5000
        if chunked:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(payload), payload)
            )
        else:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 5000\r\n\r\n"
            )
        status, headers, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 413
        assert "4096 bytes" in json.loads(body)["error"]["message"]
        assert headers["connection"] == "close"
        assert await closes(reader)
    finally:
        writer.close()
    reader, writer = await connect(server)
    try:
        writer.write(completion_request())
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
    finally:
        writer.close()


async def test_malformed_http_is_400_then_close(server):
    reader, writer = await connect(server)
    try:
        writer.write(b"GARBAGE\x01 / HTTP/9\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 400 and "Malformed HTTP request" in json.loads(body)["error"]["message"]
        assert await closes(reader)
    finally:
        writer.close()


async def test_connection_close_and_http10(server):
    reader, writer = await connect(server)
    try:
        writer.write(completion_request(extra_headers="connection: close\r\n"))
        status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200 and headers["connection"] == "close"
        assert await closes(reader)
    finally:
        writer.close()
    # HTTP/1.0 gets a stream without chunked framing, ended by closing the connection.
    reader, writer = await connect(server)
    try:
        writer.write(completion_request(stream=True).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        status, headers, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200 and "transfer-encoding" not in headers
        assert body.endswith(b"data: [DONE]\n\n")
    finally:
        writer.close()


async def test_accepted_sockets_have_tcp_nodelay(server):
    reader, writer = await connect(server)
    try:
        writer.write(completion_request())
        await asyncio.wait_for(read_response(reader), 5)
        (conn,) = server._connections
        sock = conn._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("prompt", "stream"), [("hang", True), ("hang-before-first", False)], ids=["stream", "unary"]
)
async def test_client_disconnect_closes_backend_generator(server, frontend, prompt, stream):
    reader, writer = await connect(server)
    writer.write(completion_request(prompt=prompt, stream=stream))
    if stream:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        first = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert b'"text":"first"' in first
    else:
        await asyncio.wait_for(frontend.started.wait(), 5)
    assert not frontend.closed.is_set()
    writer.transport.abort()
    await asyncio.wait_for(frontend.closed.wait(), 5)
    assert server.metrics.inflight.value == 0
    assert server.metrics.requests.get(("/v1/completions", "499")) == 1


async def test_slow_reader_pauses_the_stream_instead_of_buffering(server, frontend):
    reader, writer = await connect(server)
    try:
        writer.write(completion_request(prompt="flood", stream=True))
        # Not reading: the generator must stop once socket and transport buffers are full.
        deadline = time.monotonic() + 10
        stalled_at = -1
        while time.monotonic() < deadline:
            before = frontend.produced
            await asyncio.sleep(0.1)
            if frontend.produced == before and before > 0:
                stalled_at = before
                break
        assert 0 < stalled_at < BIG_CHUNKS // 2, f"producer did not pause ({frontend.produced})"
        (conn,) = server._connections
        assert conn.write_paused
        # Reading resumes the stream, and everything arrives.
        status, _, body = await asyncio.wait_for(read_response(reader), 30)
        assert status == 200
        assert body.count(b"x" * 1024) >= BIG_CHUNKS * (BIG_CHUNK // 1024)
        assert body.endswith(b"data: [DONE]\n\n")
    finally:
        writer.close()


async def test_graceful_stop_finishes_inflight_and_closes_idle(frontend):
    server = OpenAIHttpServer(frontend, "127.0.0.1", 0)
    await server.start()
    busy_reader, busy_writer = await connect(server)
    idle_reader, idle_writer = await connect(server)
    try:
        idle_writer.write(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await asyncio.wait_for(read_response(idle_reader), 5))[0] == 200
        busy_writer.write(completion_request(prompt="wait"))
        await asyncio.wait_for(frontend.started.wait(), 5)
        stopping = asyncio.create_task(server.stop(timeout_s=10))
        assert await closes(idle_reader)  # idle keep-alive connection: closed at once
        with pytest.raises(OSError):
            await asyncio.wait_for(connect(server), 5)  # no longer accepting
        assert not stopping.done()
        frontend.release.set()
        status, headers, body = await asyncio.wait_for(read_response(busy_reader), 5)
        assert status == 200 and json.loads(body)["choices"][0]["text"] == "released"
        assert headers["connection"] == "close"
        await asyncio.wait_for(stopping, 5)
    finally:
        busy_writer.close()
        idle_writer.close()
        await server.stop(timeout_s=1)


async def test_stop_aborts_requests_that_outlive_the_timeout(frontend):
    server = OpenAIHttpServer(frontend, "127.0.0.1", 0)
    await server.start()
    reader, writer = await connect(server)
    try:
        writer.write(completion_request(prompt="hang", stream=True))
        await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        await asyncio.wait_for(server.stop(timeout_s=0.2), 5)
        await asyncio.wait_for(frontend.closed.wait(), 5)
        assert server.connection_count == 0
    finally:
        writer.close()


async def test_idle_keepalive_connections_are_closed_after_the_timeout(frontend):
    server = OpenAIHttpServer(frontend, "127.0.0.1", 0, limits=HttpLimits(keepalive_timeout_s=0.2))
    await server.start()
    reader, writer = await connect(server)
    try:
        writer.write(completion_request())
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        assert await closes(reader)  # the sweep runs every 0.5 s at this timeout
        assert server.connection_count == 0
    finally:
        writer.close()
        await server.stop(timeout_s=1)
