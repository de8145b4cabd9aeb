"""What one client may hold or send to ``OpenAIHttpServer``, on raw sockets: request smuggling
shapes, a missing Host, size caps (413/414/431), slow clients (408, keep-alive), the
connection cap (503), and the Frontend's config keys for all of these."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from servegrid.components.frontend import Frontend
from servegrid.http import OpenAIHttpServer
from servegrid.http.limits import DEFAULT_LIMITS, HttpLimits
from servegrid.sdk.errors import UserError
from tests.unit.test_http_server import (
    ControlledFrontend,
    closes,
    completion_request,
    connect,
    read_response,
)

REPO = Path(__file__).resolve().parents[2]
HEALTH = b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
POST = b"POST /v1/completions HTTP/1.1\r\nhost: t\r\n"


@pytest.fixture
async def frontend():
    return ControlledFrontend()


async def serving(frontend: ControlledFrontend, **limits) -> OpenAIHttpServer:
    server = OpenAIHttpServer(frontend, "127.0.0.1", 0, limits=HttpLimits(**limits))
    await server.start()
    return server


@pytest.fixture
async def server(frontend):
    srv = await serving(frontend)
    try:
        yield srv
    finally:
        await srv.stop(timeout_s=5)


async def trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, piece: bytes, pause_s: float
) -> tuple[int, dict]:
    """Keep sending ``piece`` (at most 200 times) until the server answers; return the error."""
    answer = asyncio.create_task(read_response(reader))
    try:
        for _ in range(200):
            if answer.done():
                break
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause_s)
        status, headers, body = await asyncio.wait_for(answer, 5)
    finally:
        answer.cancel()
    assert headers["connection"] == "close"
    assert await closes(reader)
    return status, json.loads(body)["error"]


async def only_answer(server: OpenAIHttpServer, data: bytes) -> tuple[int, dict]:
    """Send ``data``; expect exactly one response, then the connection closed."""
    reader, writer = await connect(server)
    try:
        writer.write(data)
        status, headers, body = await asyncio.wait_for(read_response(reader), 5)
        assert headers["connection"] == "close"
        assert await closes(reader), "something after the refused request was answered"
        return status, json.loads(body)["error"]
    finally:
        writer.close()


SMUGGLING = {
    "content-length-then-chunked": POST
    + b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    + HEALTH,
    "chunked-then-content-length": POST
    + b"transfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n"
    + HEALTH,
    "duplicate-content-length": POST
    + b"content-length: 2\r\ncontent-length: 40\r\n\r\n{}"
    + HEALTH,
    "chunk-size-not-hex": POST + b"transfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative": POST + b"transfer-encoding: chunked\r\n\r\n-1\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": POST
    + b"transfer-encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n"
    + HEALTH,
    "obfuscated-transfer-encoding": POST + b"transfer-encoding: xchunked\r\n\r\n0\r\n\r\n" + HEALTH,
    "space-before-colon": POST + b"content-length : 2\r\n\r\n{}" + HEALTH,
    "folded-header": b"GET /health HTTP/1.1\r\nhost: t\r\nx: a\r\n b\r\n\r\n",
}


@pytest.mark.parametrize("data", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_request_smuggling_shapes_are_400_and_nothing_after_them_is_served(
    server, frontend, data
):
    status, error = await only_answer(server, data)
    assert status == 400 and error["message"].startswith("Malformed HTTP request")
    assert not frontend.started.is_set()
    assert server.metrics.requests.get(("other", "400")) == 1


async def test_a_request_before_a_malformed_one_is_still_answered(server):
    reader, writer = await connect(server)
    try:
        writer.write(completion_request(max_tokens=3) + POST + b"content-length: x\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert (status, json.loads(body)["choices"][0]["text"]) == (200, "answer-3")
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 400
        assert await closes(reader)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("head", "count"), [(b"GET /health HTTP/1.1\r\n", 0), (HEALTH[:-2] + b"host: u\r\n", 2)]
)
async def test_http11_needs_exactly_one_host_header(server, head, count):
    status, error = await only_answer(server, head + b"\r\n")
    assert status == 400
    assert f"exactly one Host header; this one has {count}" in error["message"]


async def test_http10_without_host_is_served(server):
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /health HTTP/1.0\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
    finally:
        writer.close()


async def test_a_url_without_end_is_414_once_over_the_cap(frontend):
    server = await serving(frontend, max_url_bytes=1024)
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /")
        status, error = await trickle(reader, writer, b"a" * 512, 0.005)  # up to 100 KB
        assert status == 414 and error["code"] == "url_too_long"
    finally:
        writer.close()
        await server.stop(timeout_s=1)


@pytest.mark.parametrize(
    "piece",
    [b"x-big: " + b"a" * 600, b"x-h: 1\r\n"],
    ids=["one-endless-header", "many-small-headers"],
)
async def test_headers_over_the_cap_are_431(frontend, piece):
    server = await serving(frontend, max_header_bytes=4096, max_headers=50)
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nhost: t\r\n")
        status, error = await trickle(reader, writer, piece, 0.005)  # the cap: 4 KB, 50 fields
        assert status == 431 and error["code"] == "headers_too_large"
    finally:
        writer.close()
        await server.stop(timeout_s=1)


async def test_the_default_body_cap_refuses_a_31mb_body_before_reading_it(server):
    reader, writer = await connect(server)
    try:
        writer.write(POST + b"content-length: %d\r\n\r\n" % (31 * 1024 * 1024))
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 413
        assert (
            f"limit of {DEFAULT_LIMITS.max_body_bytes} bytes"
            in json.loads(body)["error"]["message"]
        )
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("start", "part"),
    [(b"GET /health HTTP/1.1\r\nhost", "headers"), (POST + b"content-length: 40\r\n\r\n{", "body")],
)
async def test_a_client_sending_a_byte_at_a_time_gets_408(frontend, start, part):
    server = await serving(frontend, header_timeout_s=0.3, body_timeout_s=0.3)
    reader, writer = await connect(server)
    try:
        writer.write(start)
        # One byte every 50 ms: the connection is never idle for long, the request never ends.
        status, error = await trickle(reader, writer, b"x", 0.05)
        assert status == 408 and error["code"] == "request_timeout"
        assert f"request's {part} did not arrive" in error["message"]
    finally:
        writer.close()
        await server.stop(timeout_s=1)


async def test_a_connection_that_never_sends_is_closed_after_the_keepalive_timeout(frontend):
    server = await serving(frontend, keepalive_timeout_s=0.2)
    reader, writer = await connect(server)
    try:
        assert await closes(reader)
        assert server.connection_count == 0
    finally:
        writer.close()
        await server.stop(timeout_s=1)


async def test_connections_over_the_cap_get_503_when_every_connection_is_busy(frontend):
    server = await serving(frontend, max_connections=2)
    held = [await connect(server) for _ in range(2)]
    try:
        for _, writer in held:  # both admitted, each with a request under way
            writer.write(completion_request(prompt="wait"))
        for _ in range(500):
            if server.metrics.inflight.value == 2:
                break
            await asyncio.sleep(0.01)
        assert server.metrics.inflight.value == 2
        reader, writer = await connect(server)
        status, headers, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections"
        assert headers["connection"] == "close" and await closes(reader)
        writer.close()
        assert server.metrics.refused_connections.get() == 1
        assert server.metrics.evicted_connections.get() == 0  # nothing idle to make room
        frontend.release.set()  # the busy ones were not disturbed: both are answered
        for reader, _ in held:
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and b"released" in body
    finally:
        for _, writer in held:
            writer.close()
        await server.stop(timeout_s=1)


async def test_at_the_cap_the_longest_idle_connection_makes_room_for_health(frontend):
    """A flood of idle keep-alive connections must not lock /health out until they time out."""
    cap = 6
    server = await serving(frontend, max_connections=cap, keepalive_timeout_s=600)
    held = []
    try:
        for _ in range(cap):  # cap keep-alive connections, each served once, then idle
            reader, writer = await connect(server)
            held.append((reader, writer))
            writer.write(HEALTH)
            assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        busy_reader, busy_writer = held[1]
        busy_writer.write(completion_request(prompt="wait"))  # not idle: never evicted
        await asyncio.wait_for(frontend.started.wait(), 5)
        assert server.connection_count == cap

        for round_ in range(2):  # each new connection takes the slot of the longest idle
            reader, writer = await connect(server)
            held.append((reader, writer))
            writer.write(HEALTH)
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert (status, json.loads(body)["status"]) == (200, "ok")
            assert server.metrics.evicted_connections.get() == round_ + 1
        assert server.metrics.refused_connections.get() == 0
        assert await closes(held[0][0]) and await closes(held[2][0])  # the two longest idle
        assert server.connection_count == cap

        frontend.release.set()  # the busy one is answered on its own connection
        status, _, body = await asyncio.wait_for(read_response(busy_reader), 5)
        assert status == 200 and b"released" in body
        for reader, writer in held[3:]:  # the other idle ones still serve
            writer.write(HEALTH)
            assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
    finally:
        for _, writer in held:
            writer.close()
        await server.stop(timeout_s=1)


async def test_a_client_that_never_reads_its_stream_is_cut_and_its_request_cancelled(frontend):
    server = await serving(frontend, write_timeout_s=0.3)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once, no autotuning
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    _reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(completion_request(prompt="flood", stream=True))  # and never read
        await asyncio.wait_for(frontend.closed.wait(), 30)  # the backend stream was closed
        metrics = server.metrics
        assert metrics.write_timeouts.get() == 1
        assert frontend.produced < 800  # cut while paused, not after generating everything
        assert metrics.inflight.value == 0
        assert metrics.requests.get(("/v1/completions", "499")) == 1
        assert b"servegrid_frontend_write_timeouts_total 1" in metrics.render()
        assert server.connection_count == 0
    finally:
        writer.close()
        await server.stop(timeout_s=1)


def test_frontend_config_keys_build_the_limits_and_bad_values_name_the_key():
    frontend = Frontend(max_connections=10, header_timeout_s=2.5, keepalive_timeout_s=1)
    assert frontend.limits == HttpLimits(
        max_connections=10, header_timeout_s=2.5, keepalive_timeout_s=1.0
    )
    assert Frontend().limits == DEFAULT_LIMITS
    with pytest.raises(UserError, match=r"max-connections: Input should be greater than"):
        Frontend(max_connections=0)


def test_every_limit_is_documented_with_its_default():
    doc = (REPO / "docs" / "frontend.md").read_text()
    for name, field in HttpLimits.model_fields.items():
        key = name.replace("_", "-")
        row = re.search(rf"^\| `{key}` \| `([^`]+)` \|", doc, re.MULTILINE)
        assert row is not None, f"docs/frontend.md has no row for {key}"
        assert float(row.group(1)) == float(field.default), key


@pytest.mark.parametrize(
    ("soft", "hard", "cap", "soft_after"),
    [(300, 300, 150, 300), (300, 4096, 2048, 2048 + 256), (4096, 4096, 2048, 4096)],
    ids=["hard-limit-too-low", "raised-to-fit", "already-enough"],
)
def test_the_connection_cap_fits_the_open_file_limit(soft, hard, cap, soft_after):
    # In a child process: the limit is process-wide and this one must keep its own.
    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from servegrid.http.server import fit_connection_cap\n"
        "print(fit_connection_cap(2048), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == [str(cap), str(soft_after)]
    assert ("serving at most 150 connections" in out.stderr) == (cap == 150)
