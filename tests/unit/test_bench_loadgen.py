"""The benchmark load generator (bench/loadgen.py) against a real, tiny OpenAI-style server.

The server (bench/canned_server.py) runs for real on 127.0.0.1: in this process for the
programmatic tests, in a child process for the command-line and CPU-cost tests (so that the
client's CPU time is its own).
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import canned_server  # noqa: E402
import loadgen  # noqa: E402
from canned_server import CannedServer  # noqa: E402
from loadgen import LoadConfig, run_load  # noqa: E402


@pytest.fixture
async def server() -> AsyncIterator[CannedServer]:
    srv = CannedServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


async def test_non_streaming_counts_requests_and_tokens(server: CannedServer) -> None:
    cfg = LoadConfig(url=server.url, requests=60, concurrency=4, max_tokens=7, warmup=5)
    r = await run_load(cfg)
    assert r.model == canned_server.MODEL_ID  # discovered from GET /v1/models
    assert (r.requests_ok, r.requests_failed, r.errors) == (60, 0, {})
    assert r.output_tokens == 60 * 7
    assert r.stopped_by == "requests"
    # Warmup requests reach the server but stay out of the figures.
    assert server.stats.completions == 65
    assert server.stats.models == 1
    assert server.stats.paths == {"/v1/models": 1, "/v1/completions": 65}
    # One keep-alive connection per worker, plus the one that listed the models.
    assert server.stats.connections == 4 + 1
    assert r.ttft_p50_ms == r.latency_p50_ms  # no stream: the first token comes with the last
    assert r.itl_p50_ms is None
    assert r.client_cpu_us_per_request is not None and r.client_cpu_us_per_request > 0


async def test_sse_stream_over_chunks_split_mid_event_is_reassembled() -> None:
    srv = CannedServer(split_events=True)
    await srv.start()
    try:
        cfg = LoadConfig(
            url=srv.url + "/v1", endpoint="chat", stream=True, requests=30, concurrency=3,
            max_tokens=9, model="m",
        )  # fmt: skip
        r = await run_load(cfg)
    finally:
        await srv.close()
    assert (r.requests_ok, r.errors) == (30, {})
    assert r.output_tokens == 30 * 9  # from the usage chunk
    assert srv.stats.streamed == 30
    assert srv.stats.paths == {"/v1/chat/completions": 30}  # --model given: no /v1/models
    assert r.ttft_p50_ms is not None and r.itl_p50_ms is not None
    assert r.ttft_p50_ms <= r.latency_p50_ms


async def test_stream_without_usage_counts_content_events() -> None:
    srv = CannedServer(omit_usage=True)
    await srv.start()
    try:
        r = await run_load(
            LoadConfig(url=srv.url, stream=True, requests=12, concurrency=2, max_tokens=5)
        )
        # The chat stream's first, role-only chunk carries no text and is not a token.
        chat = await run_load(
            LoadConfig(
                url=srv.url, endpoint="chat", stream=True, requests=4, concurrency=2, max_tokens=3
            )
        )
    finally:
        await srv.close()
    assert (r.requests_ok, r.output_tokens) == (12, 12 * 5)
    assert (chat.requests_ok, chat.output_tokens) == (4, 4 * 3)


async def test_non_streaming_without_usage_estimates_tokens_from_words() -> None:
    srv = CannedServer(omit_usage=True)
    await srv.start()
    try:
        r = await run_load(LoadConfig(url=srv.url, endpoint="chat", requests=5, max_tokens=4))
    finally:
        await srv.close()
    assert (r.requests_ok, r.output_tokens) == (5, 5 * 4)


@pytest.mark.parametrize("stream", [False, True])
async def test_500_answers_are_counted_as_errors_by_status(stream: bool) -> None:
    srv = CannedServer(fail_every=5)
    await srv.start()
    try:
        r = await run_load(LoadConfig(url=srv.url, requests=50, concurrency=4, stream=stream))
    finally:
        await srv.close()
    assert r.errors == {"500": 10}
    assert (r.requests_ok, r.requests_failed) == (40, 10)
    assert r.output_tokens == 40 * 32
    assert srv.stats.failed == 10


async def test_duration_bounds_a_run_without_a_request_count(server: CannedServer) -> None:
    r = await asyncio.wait_for(
        run_load(LoadConfig(url=server.url, duration=0.3, concurrency=2, model="m")), 60
    )
    assert r.stopped_by == "duration"
    assert r.requests_ok > 0 and r.requests_failed == 0
    assert r.requests_ok <= server.stats.completions  # counted from answers the server gave
    assert r.wall_s >= 0.3  # it ran for the duration (how much longer depends on the machine)


async def test_a_server_that_never_answers_gives_timeouts_not_a_hang() -> None:
    transports: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)

    loop = asyncio.get_running_loop()
    silent = await loop.create_server(Silent, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        cfg = LoadConfig(
            url=f"http://127.0.0.1:{port}", model="m", requests=4, concurrency=2, timeout=0.3
        )
        r = await asyncio.wait_for(run_load(cfg), 10)
    finally:
        silent.close()
        for t in transports:
            t.abort()
        await silent.wait_closed()
    assert r.errors == {"timeout": 4}
    assert r.requests_ok == 0


def test_prompts_share_the_requested_prefix_and_have_the_requested_length() -> None:
    prompts = loadgen.build_prompts(20, prompt_tokens=40, shared_prefix_ratio=0.25, seed=1)
    words = [p.split() for p in prompts]
    assert all(len(w) == 40 for w in words)
    assert len({tuple(w[:10]) for w in words}) == 1  # 25% of 40 words shared by all
    assert len({tuple(w[10:]) for w in words}) == 20  # the rest distinct
    assert loadgen.build_prompts(3, 8, 0.0, seed=1) == loadgen.build_prompts(3, 8, 0.0, seed=1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "0"], "--concurrency must be"),
        (["--url", "https://127.0.0.1:1"], "only plain http://"),
        (["--shared-prefix-ratio", "2"], "--shared-prefix-ratio"),
        (["--url", "http://127.0.0.1:1", "--requests", "1"], "cannot connect"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loadgen.main(flags) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.fixture
def canned_process() -> Iterator[Callable[..., str]]:
    """Starts canned servers in child processes; each call returns one's URL."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "canned_server.py"), "--port", "0", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "canned server on http://127.0.0.1:PORT"
        assert line.startswith("canned server on "), line
        return line.split()[-1]

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _cli(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "loadgen.py"), "--url", url, *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_json_result_and_client_cpu_is_the_processes_own(
    canned_process: Callable[..., str],
) -> None:
    url = canned_process()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = _cli(url, "--requests", "4000", "--warmup", "200", "--concurrency", "32", "--json")
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["requests_ok"] == 4000 and result["errors"] == {}
    assert result["output_tokens"] == 4000 * 32
    # The reported client CPU covers the measured phase only, so it is a positive part of
    # what the kernel charged the loadgen process for its whole life (its size is a bench/
    # figure, not a test). A unit slip (ms for µs) or a wrong divisor breaks this.
    whole_life_s = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    measured_s = result["client_cpu_us_per_request"] * result["requests_ok"] / 1e6
    assert 0 < measured_s <= whole_life_s, (measured_s, whole_life_s)


def test_cli_prints_a_table_and_exits_1_when_every_request_failed(
    canned_process: Callable[..., str],
) -> None:
    ok = _cli(canned_process(), "--requests", "20", "--stream", "--endpoint", "chat")
    assert ok.returncode == 0, ok.stderr
    assert "requests/s" in ok.stdout and "TTFT p50" in ok.stdout
    assert "ok=20 failed=0" in ok.stdout  # the one-line summary
    bad = _cli(canned_process("--fail-every", "1"), "--requests", "20")
    assert bad.returncode == 1
    assert "every request failed" in bad.stderr
    assert "500: 20" in bad.stdout


async def test_ttft_and_inter_token_latency_follow_the_servers_pacing() -> None:
    # First token 40 ms after the request, then one every 10 ms: the figures cannot be lower.
    srv = CannedServer(delay_s=0.04, token_interval_s=0.01)
    await srv.start()
    try:
        cfg = LoadConfig(url=srv.url, stream=True, requests=4, concurrency=2, max_tokens=4)
        r = await run_load(cfg)
    finally:
        await srv.close()
    assert (r.requests_ok, r.output_tokens) == (4, 16)
    assert r.ttft_p50_ms is not None and r.itl_p50_ms is not None
    assert r.latency_p50_ms is not None
    # Only what the server's pacing forces: no first token before 40 ms, no end before the
    # last token. Gaps between tokens as the client sees them shrink when it reads late
    # (several events in one read), so ITL has no floor here; its figures belong in bench/.
    assert r.ttft_p50_ms >= 40
    assert r.latency_p50_ms >= 40 + 3 * 10
    assert r.itl_p50_ms <= r.latency_p50_ms
