"""A bounded, cheap load generator for any OpenAI-compatible HTTP server.

It measures what a serving stack delivers: requests/s, output tokens/s, time to first token,
inter-token latency, end-to-end latency, errors by status, and what the client itself cost in
CPU per request (so that a figure taken with client and server on one small machine can be read
honestly).

The client must stay far cheaper than the server it loads (the target is ~1,000 requests/s on a
2-core machine that also runs the whole serving graph), so the hot loop uses no HTTP library:
one persistent HTTP/1.1 keep-alive connection per concurrent worker on raw asyncio protocols,
request bytes built once before the run, responses parsed by `httptools` (C), JSON decoded by
`msgspec` into small typed structs.

    python bench/loadgen.py --url http://127.0.0.1:8000 --requests 5000 --concurrency 32

Every run is bounded: by `--requests` and/or `--duration` (whichever ends first), both capped,
and every request by `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import msgspec

# Hard caps: a run never exceeds these, whatever the flags say.
MAX_REQUESTS = 10_000_000
MAX_DURATION_S = 3_600.0
MAX_CONCURRENCY = 4_096
DEFAULT_REQUESTS = 1_000  # used when neither --requests nor --duration is given
# Distinct prompts built before the run; requests cycle through them.
DEFAULT_UNIQUE_PROMPTS = 1_024


class LoadgenError(Exception):
    """A problem the user can fix (bad flag, unreachable server); printed without a traceback."""


# --------------------------------------------------------------------------------------------
# Configuration and result


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id from GET /v1/models
    endpoint: str = "completions"  # "completions" or "chat"
    concurrency: int = 32
    requests: int | None = None
    duration: float | None = None
    max_tokens: int = 32
    prompt_tokens: int = 32
    shared_prefix_ratio: float = 0.0
    unique_prompts: int = DEFAULT_UNIQUE_PROMPTS
    stream: bool = False
    warmup: int = 0
    ignore_eos: bool = False
    timeout: float = 60.0
    api_key: str | None = None
    seed: int = 0

    def validate(self) -> None:
        """Apply defaults and the hard caps; raise LoadgenError naming the bad flag."""
        if self.endpoint not in ("completions", "chat"):
            raise LoadgenError(f"--endpoint must be 'chat' or 'completions', not {self.endpoint!r}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise LoadgenError(
                f"--concurrency must be 1..{MAX_CONCURRENCY}, not {self.concurrency}"
            )
        if self.requests is None and self.duration is None:
            self.requests = DEFAULT_REQUESTS
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise LoadgenError(f"--requests must be 1..{MAX_REQUESTS}, not {self.requests}")
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION_S:
            raise LoadgenError(f"--duration must be in (0, {MAX_DURATION_S:g}] s")
        if not 0 <= self.warmup <= MAX_REQUESTS:
            raise LoadgenError(f"--warmup must be 0..{MAX_REQUESTS}, not {self.warmup}")
        if self.max_tokens < 1 or self.prompt_tokens < 1:
            raise LoadgenError("--max-tokens and --prompt-tokens must be at least 1")
        if not 0.0 <= self.shared_prefix_ratio <= 1.0:
            raise LoadgenError("--shared-prefix-ratio must be between 0 and 1")
        if self.unique_prompts < 1:
            raise LoadgenError("--unique-prompts must be at least 1")
        if not 0 < self.timeout <= MAX_DURATION_S:
            raise LoadgenError(f"--timeout must be in (0, {MAX_DURATION_S:g}] s")


@dataclass
class LoadResult:
    """One run's figures. Times in milliseconds unless the name says otherwise."""

    url: str
    model: str
    endpoint: str
    stream: bool
    concurrency: int
    warmup: int
    prompt_tokens: int
    max_tokens: int
    requests_ok: int
    requests_failed: int
    errors: dict[str, int]
    stopped_by: str  # "requests" or "duration"
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None  # streaming only: (last token - first token) / (tokens - 1)
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_mean_ms: float | None
    client_cpu_s: float
    client_cpu_us_per_request: float | None
    event_loop: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Response shapes: only the fields we read; msgspec skips the rest without building them.


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # completions
    delta: _Message | None = None  # chat stream
    message: _Message | None = None  # chat, non-streaming


class _Response(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model] = []


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_models = msgspec.json.Decoder(_ModelList).decode
_encode = msgspec.json.encode


def _has_content(resp: _Response) -> bool:
    for ch in resp.choices:
        if ch.text or (ch.delta is not None and ch.delta.content):
            return True
    return False


class _BadResponse(Exception):
    """The server answered 200 but the body was not what the OpenAI protocol says."""


# --------------------------------------------------------------------------------------------
# The HTTP/1.1 client: one protocol object per connection, one request in flight at a time.


class _Conn(asyncio.Protocol):
    """A keep-alive connection; `send()` writes prebuilt bytes and waits for the whole answer.

    httptools undoes chunked encoding and hands us body pieces; for a stream we split them
    into SSE lines ourselves, since one event may span pieces and one piece may hold many.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.timed_out = False
        self.t_sent = 0.0
        self.stream = False
        self.sse = False  # stream and the answer is 200: parse the body as SSE
        self.body: list[bytes] = []
        self.sse_buf = b""
        self.events = 0  # SSE events that carried output text
        self.t_first = 0.0
        self.t_last = 0.0
        self.usage_tokens = -1
        self.done = False
        self.stream_error = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, _BadResponse) as exc:
            self._fail(exc)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError("server closed the connection"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.sse = self.stream and self.parser.get_status_code() == 200

    def on_body(self, body: bytes) -> None:
        if not self.sse:
            self.body.append(body)
            return
        buf = self.sse_buf + body if self.sse_buf else body
        lines = buf.split(b"\n")
        self.sse_buf = lines.pop()
        now = 0.0
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, "event:" lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            try:
                ev = _decode_response(payload)
            except msgspec.DecodeError as exc:
                raise _BadResponse(f"undecodable SSE event: {payload[:80]!r}") from exc
            if ev.error is not None:
                self.stream_error = True
            if ev.usage is not None:
                self.usage_tokens = ev.usage.completion_tokens
            if _has_content(ev):
                if not now:
                    now = time.perf_counter()
                if not self.events:
                    self.t_first = now
                self.t_last = now
                self.events += 1

    def on_message_complete(self) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())
        if not self.parser.should_keep_alive():
            self.abort()

    # our side
    def _fail(self, exc: Exception) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes, stream: bool, now: float) -> asyncio.Future[int]:
        assert self.transport is not None
        self.stream = stream
        self.body = []
        self.sse_buf = b""
        self.events = 0
        self.usage_tokens = -1
        self.done = False
        self.stream_error = False
        self.t_sent = now
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.transport.write(data)
        return waiter


async def _connect(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, host, port)
    return conn


# --------------------------------------------------------------------------------------------
# Prompts and request bytes, all built before the clock starts.

# A small vocabulary of common English words, each about one token for BPE tokenizers, so that
# --prompt-tokens N gives a prompt of roughly N tokens.
_WORDS = (
    "the of and to in is was for on are with as at be by this have from or one had not but what "
    "all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much before go "
    "good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things help "
    "put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end "
    "along while might next sound below saw something thought both few those always looked show "
    "large often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head above "
    "kind began almost live page got earth need far hand high year mother light parts country "
    "father let night following picture being study second eyes soon times story boys since "
    "white days ever paper hard near sentence better best across during today others however "
    "sure means knew try told young miles sun ways thing whole hear example heard several change "
    "answer room sea against top turned learn point city play toward five using himself usually"
).split()


def build_prompts(
    n_prompts: int, prompt_tokens: int, shared_prefix_ratio: float, seed: int
) -> list[str]:
    """`n_prompts` distinct prompts of ~`prompt_tokens` words; the first share a common prefix.

    The first `round(ratio * prompt_tokens)` words are the same in every prompt (what a KV-aware
    router can exploit); the rest are drawn independently per prompt.
    """
    rng = random.Random(seed)
    n_shared = round(shared_prefix_ratio * prompt_tokens)
    prefix = rng.choices(_WORDS, k=n_shared)
    prompts = []
    for _ in range(n_prompts):
        words = prefix + rng.choices(_WORDS, k=prompt_tokens - n_shared)
        prompts.append(" ".join(words))
    return prompts


@dataclass
class _Target:
    host: str
    port: int
    base_path: str  # "" or a prefix such as "/proxy", never ending in "/"
    host_header: str


def parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise LoadgenError(
            f"--url {url!r}: only plain http:// is supported (the benchmark runs on loopback)"
        )
    if not parts.hostname:
        raise LoadgenError(f"--url {url!r} has no host; write e.g. http://127.0.0.1:8000")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise LoadgenError(f"--url {url!r}: {exc}") from None
    base = parts.path.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]  # accept both http://h:p and http://h:p/v1
    return _Target(parts.hostname, port, base, parts.netloc)


def _http_request(
    target: _Target, method: str, path: str, body: bytes, api_key: str | None
) -> bytes:
    lines = [
        f"{method} {target.base_path}{path} HTTP/1.1",
        f"Host: {target.host_header}",
        "Accept: */*",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def build_requests(cfg: LoadConfig, target: _Target, model: str) -> list[bytes]:
    n = cfg.unique_prompts
    if cfg.requests is not None:
        n = min(n, cfg.requests + cfg.warmup)
    prompts = build_prompts(n, cfg.prompt_tokens, cfg.shared_prefix_ratio, cfg.seed)
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    out = []
    for prompt in prompts:
        body: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens, "stream": cfg.stream}
        if cfg.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if cfg.stream:
            body["stream_options"] = {"include_usage": True}
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        out.append(_http_request(target, "POST", path, _encode(body), cfg.api_key))
    return out


async def fetch_first_model(target: _Target, api_key: str | None, limit_s: float) -> str:
    """The first model id that GET /v1/models lists."""
    where = f"http://{target.host_header}{target.base_path}/v1/models"
    try:
        conn = await asyncio.wait_for(_connect(target.host, target.port), limit_s)
    except (OSError, TimeoutError) as exc:
        raise LoadgenError(f"cannot connect to {where}: {exc}; is the server running?") from None
    try:
        req = _http_request(target, "GET", "/v1/models", b"", api_key)
        status = await asyncio.wait_for(conn.send(req, False, time.perf_counter()), limit_s)
        body = b"".join(conn.body)
    except (OSError, TimeoutError, httptools.HttpParserError) as exc:
        raise LoadgenError(f"GET {where} failed: {exc!r}; pass --model to skip it") from None
    finally:
        conn.abort()
    if status != 200:
        raise LoadgenError(f"GET {where} answered {status}: {body[:200]!r}; pass --model")
    try:
        models = _decode_models(body)
    except msgspec.DecodeError:
        raise LoadgenError(f"GET {where} did not return a model list; pass --model") from None
    if not models.data:
        raise LoadgenError(f"GET {where} lists no models; pass --model")
    return models.data[0].id


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class _Stats:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass
class _Phase:
    """One phase (warmup or measured): its request budget, deadline and stats."""

    limit: int
    deadline: float
    stats: _Stats
    issued: int = 0
    stopped_by: str = "requests"


def _count_output(conn: _Conn, stream: bool) -> int:
    """Output tokens of a finished 200 answer; raises _BadResponse when it is malformed."""
    if stream:
        if conn.stream_error:
            raise _BadResponse("stream-error")
        if not conn.done:
            raise _BadResponse("stream-no-done")
        return conn.usage_tokens if conn.usage_tokens > 0 else conn.events
    try:
        resp = _decode_response(b"".join(conn.body))
    except msgspec.DecodeError:
        raise _BadResponse("bad-json") from None
    if resp.error is not None:
        raise _BadResponse("error-body")
    if resp.usage is not None:
        return resp.usage.completion_tokens
    # No usage block: estimate from the text, one token per word.
    n = 0
    for ch in resp.choices:
        text = ch.text if ch.text is not None else (ch.message.content if ch.message else None)
        n += len(text.split()) if text else 0
    return n


async def _worker(
    conns: list[_Conn | None],
    slot: int,
    target: _Target,
    reqs: list[bytes],
    stream: bool,
    phase: _Phase,
    offset: int,
) -> None:
    stats = phase.stats
    perf = time.perf_counter
    n_reqs = len(reqs)
    while phase.issued < phase.limit:
        t0 = perf()
        if t0 >= phase.deadline:
            phase.stopped_by = "duration"
            return
        i = phase.issued
        phase.issued = i + 1
        conn = conns[slot]
        if conn is None or conn.closed:
            try:
                conn = await _connect(target.host, target.port)
            except OSError:
                stats.error("connect")
                conns[slot] = None
                # A refused connect returns at once: back off so a dead server is not spun on.
                await asyncio.sleep(0.05)
                continue
            conns[slot] = conn
            t0 = perf()
        try:
            status = await conn.send(reqs[(offset + i) % n_reqs], stream, t0)
        except (OSError, httptools.HttpParserError, _BadResponse) as exc:
            conns[slot] = None
            if conn.timed_out:
                stats.error("timeout")
            elif isinstance(exc, _BadResponse | httptools.HttpParserError):
                stats.error("bad-http")
            else:
                stats.error("connection")
            continue
        t_end = perf()
        if status != 200:
            stats.error(str(status))
            continue
        try:
            tokens = _count_output(conn, stream)
        except _BadResponse as exc:
            stats.error(str(exc))
            continue
        stats.latencies.append(t_end - t0)
        stats.output_tokens += tokens
        if stream:
            if conn.events:
                stats.ttfts.append(conn.t_first - t0)
                if tokens > 1:
                    stats.itls.append((conn.t_last - conn.t_first) / (tokens - 1))
        else:
            stats.ttfts.append(t_end - t0)


async def _watchdog(conns: list[_Conn | None], limit_s: float) -> None:
    """Abort any connection whose request has outlived --timeout (cheaper than a timer each)."""
    period = min(0.25, limit_s / 4)
    while True:
        await asyncio.sleep(period)
        now = time.perf_counter()
        for conn in conns:
            if conn is not None and conn.waiter is not None and now - conn.t_sent > limit_s:
                conn.timed_out = True
                conn.abort()


async def _run_phase(
    conns: list[_Conn | None],
    target: _Target,
    reqs: list[bytes],
    cfg: LoadConfig,
    phase: _Phase,
    offset: int,
) -> None:
    workers = [
        _worker(conns, slot, target, reqs, cfg.stream, phase, offset)
        for slot in range(min(len(conns), phase.limit))
    ]
    await asyncio.gather(*workers)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile of an already sorted list, None when it is empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


async def run_load(cfg: LoadConfig) -> LoadResult:
    """Run the load described by `cfg` against its server and return the figures."""
    cfg.validate()
    target = parse_url(cfg.url)
    model = cfg.model or await fetch_first_model(target, cfg.api_key, cfg.timeout)
    reqs = build_requests(cfg, target, model)

    where = f"{target.host}:{target.port}"
    results = await asyncio.gather(
        *(_connect(target.host, target.port) for _ in range(cfg.concurrency)),
        return_exceptions=True,
    )
    conns: list[_Conn | None] = [r if isinstance(r, _Conn) else None for r in results]
    if not any(conns):
        raise LoadgenError(f"cannot connect to {where}: {results[0]}; is the server running?")

    watchdog = asyncio.create_task(_watchdog(conns, cfg.timeout))
    try:
        if cfg.warmup:
            warm = _Phase(cfg.warmup, time.perf_counter() + MAX_DURATION_S, _Stats())
            await _run_phase(conns, target, reqs, cfg, warm, 0)
        limit = cfg.requests if cfg.requests is not None else MAX_REQUESTS
        duration = cfg.duration if cfg.duration is not None else MAX_DURATION_S
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        phase = _Phase(limit, t0 + duration, _Stats())
        await _run_phase(conns, target, reqs, cfg, phase, cfg.warmup)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        watchdog.cancel()
        for conn in conns:
            if conn is not None:
                conn.abort()

    stats = phase.stats
    ok = len(stats.latencies)
    failed = sum(stats.errors.values())
    lat = sorted(stats.latencies)
    ttft = sorted(stats.ttfts)
    itl = sorted(stats.itls)
    done = ok + failed
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return LoadResult(
        url=cfg.url,
        model=model,
        endpoint=cfg.endpoint,
        stream=cfg.stream,
        concurrency=cfg.concurrency,
        warmup=cfg.warmup,
        prompt_tokens=cfg.prompt_tokens,
        max_tokens=cfg.max_tokens,
        requests_ok=ok,
        requests_failed=failed,
        errors=dict(sorted(stats.errors.items())),
        stopped_by=phase.stopped_by,
        wall_s=round(wall, 4),
        requests_per_s=round(ok / wall, 2) if wall > 0 else 0.0,
        output_tokens=stats.output_tokens,
        output_tokens_per_s=round(stats.output_tokens / wall, 2) if wall > 0 else 0.0,
        ttft_p50_ms=_ms(_percentile(ttft, 50)),
        ttft_p99_ms=_ms(_percentile(ttft, 99)),
        itl_p50_ms=_ms(_percentile(itl, 50)) if cfg.stream else None,
        latency_p50_ms=_ms(_percentile(lat, 50)),
        latency_p99_ms=_ms(_percentile(lat, 99)),
        latency_mean_ms=_ms(sum(lat) / ok) if ok else None,
        client_cpu_s=round(cpu, 4),
        client_cpu_us_per_request=round(cpu / done * 1e6, 1) if done else None,
        event_loop=loop_name,
    )


# --------------------------------------------------------------------------------------------
# Command line


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}{unit}"


def summary_line(r: LoadResult) -> str:
    mode = "stream" if r.stream else "no-stream"
    errors = ",".join(f"{k}:{v}" for k, v in r.errors.items()) or "none"
    return (
        f"{r.endpoint}/{mode} c={r.concurrency} ok={r.requests_ok} failed={r.requests_failed} "
        f"rps={r.requests_per_s:.1f} out_tok/s={r.output_tokens_per_s:.1f} "
        f"ttft_p50={_fmt(r.ttft_p50_ms)}ms lat_p50={_fmt(r.latency_p50_ms)}ms "
        f"lat_p99={_fmt(r.latency_p99_ms)}ms client_cpu={_fmt(r.client_cpu_us_per_request)}us/req "
        f"errors={errors}"
    )


def print_report(r: LoadResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"loadgen: {r.url}  model={r.model}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("endpoint", f"{r.endpoint} ({'stream' if r.stream else 'no-stream'})"),
        ("concurrency", str(r.concurrency)),
        ("prompt / max tokens", f"~{r.prompt_tokens} / {r.max_tokens}"),
        ("requests ok / failed", f"{r.requests_ok} / {r.requests_failed}"),
        ("stopped by", f"{r.stopped_by} after {r.wall_s:.2f} s (warmup {r.warmup} excluded)"),
        ("requests/s", _fmt(r.requests_per_s)),
        ("output tokens/s", _fmt(r.output_tokens_per_s)),
        ("output tokens", str(r.output_tokens)),
        ("TTFT p50 / p99", f"{_fmt(r.ttft_p50_ms, ' ms')} / {_fmt(r.ttft_p99_ms, ' ms')}"),
        ("ITL p50", _fmt(r.itl_p50_ms, " ms")),
        ("latency p50 / p99", f"{_fmt(r.latency_p50_ms, ' ms')} / {_fmt(r.latency_p99_ms, ' ms')}"),
        ("latency mean", _fmt(r.latency_mean_ms, " ms")),
        ("errors", ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none"),
        (
            "client CPU",
            f"{r.client_cpu_s:.3f} s, {_fmt(r.client_cpu_us_per_request, ' µs')}/request"
            f" ({r.event_loop})",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    console.print(summary_line(r), soft_wrap=True, highlight=False)


def parse_args(argv: list[str] | None) -> tuple[LoadConfig, bool]:
    p = argparse.ArgumentParser(
        prog="loadgen",
        description="Bounded load generator for an OpenAI-compatible server (HTTP on loopback).",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", help="model name (default: first id from GET /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    p.add_argument("--concurrency", type=int, default=32, help="connections = requests in flight")
    p.add_argument("--requests", type=int, help=f"measured requests (default {DEFAULT_REQUESTS})")
    p.add_argument("--duration", type=float, help="seconds; whichever of the two ends first")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32, help="approximate prompt length")
    p.add_argument(
        "--shared-prefix-ratio",
        type=float,
        default=0.0,
        help="fraction of each prompt that is the same in every prompt (0..1)",
    )
    p.add_argument(
        "--unique-prompts",
        type=int,
        default=DEFAULT_UNIQUE_PROMPTS,
        help="distinct prompts built before the run; requests cycle through them",
    )
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--warmup", type=int, default=0, help="requests run first, excluded from stats")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    cfg = LoadConfig(
        url=a.url,
        model=a.model,
        endpoint=a.endpoint,
        concurrency=a.concurrency,
        requests=a.requests,
        duration=a.duration,
        max_tokens=a.max_tokens,
        prompt_tokens=a.prompt_tokens,
        shared_prefix_ratio=a.shared_prefix_ratio,
        unique_prompts=a.unique_prompts,
        stream=a.stream,
        warmup=a.warmup,
        ignore_eos=a.ignore_eos,
        timeout=a.timeout,
        api_key=a.api_key,
        seed=a.seed,
    )
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when any request succeeded, 1 when every request failed, 2 on bad input."""
    cfg, as_json = parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        result = runner(run_load(cfg))
    except LoadgenError as exc:
        print(f"loadgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    if as_json:
        sys.stdout.write(_encode(result.to_dict()).decode() + "\n")
    else:
        print_report(result)
    if result.requests_ok == 0:
        print("loadgen: every request failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
