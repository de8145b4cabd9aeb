"""Serve a graph config and load it: the serving-stack figures in one command.

    python bench/graph_bench.py                      # configs/agg.yaml, the tracked scenario
    python bench/graph_bench.py -f configs/agg_router.yaml --requests 10000

It starts ``servegrid serve`` (its own discovery directory, a free port, the mocker at a
high speedup so the serving stack's own cost dominates), waits for /health, runs the load
generator for each scenario, and prints requests/s, tokens/s, latencies and CPU per request:
the client's, and the whole served process tree's (supervisor, frontend, workers, nats).
Then it stops the graph. Every run is bounded by ``--requests`` per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import LoadConfig, LoadResult, run_load  # noqa: E402
from servegrid.distributed.embedded_nats import free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCENARIOS = {
    "completions": ("completions", False),
    "chat": ("chat", False),
    "chat-stream": ("chat", True),
}


def tree_cpu_seconds(root: int) -> float:
    """user+system CPU of ``root`` and all its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)
    total = 0.0
    todo = [root]
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        todo.extend(children.get(pid, []))
    return total


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"servegrid serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}/health did not answer within {timeout:.0f}s")


HEADERS = ["scenario", "req/s", "out tok/s", "TTFT p50/p99 ms", "ITL p50 ms"]
HEADERS += ["latency p50/p99 ms", "server µs CPU/req", "client µs CPU/req", "errors"]


def row(name: str, result: LoadResult, server_cpu_s: float) -> list[str]:
    done = max(result.requests_ok + result.requests_failed, 1)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return [
        name,
        f"{result.requests_per_s:,.0f}",
        f"{result.output_tokens_per_s:,.0f}",
        f"{ms(result.ttft_p50_ms)} / {ms(result.ttft_p99_ms)}",
        ms(result.itl_p50_ms),
        f"{ms(result.latency_p50_ms)} / {ms(result.latency_p99_ms)}",
        f"{server_cpu_s / done * 1e6:,.0f}",
        f"{result.client_cpu_us_per_request or 0:,.0f}",
        str(sum(result.errors.values())),
    ]


async def run_scenarios(args: argparse.Namespace, url: str, serve_pid: int) -> list[list[str]]:
    rows = []
    for name in args.scenarios.split(","):
        endpoint, stream = SCENARIOS[name]
        config = LoadConfig(
            url=url,
            endpoint=endpoint,
            stream=stream,
            concurrency=args.concurrency,
            requests=args.requests,
            warmup=args.warmup,
            max_tokens=args.max_tokens,
            prompt_tokens=args.prompt_tokens,
        )
        # Warm-up requests run inside run_load; measure server CPU over the whole call and
        # scale by the measured share so warm-up does not count.
        before = tree_cpu_seconds(serve_pid)
        result = await run_load(config)
        spent = tree_cpu_seconds(serve_pid) - before
        measured = result.requests_ok + result.requests_failed
        share = measured / max(measured + args.warmup, 1)
        rows.append(row(f"{endpoint} {'stream' if stream else 'no-stream'}", result, spent * share))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-f", "--config", default=str(REPO / "configs" / "agg.yaml"))
    parser.add_argument("--workers", type=int, default=2, help="Worker processes")
    parser.add_argument("--speedup", type=float, default=1000.0, help="mocker speedup-ratio")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--requests", type=int, default=20000, help="measured requests per scenario"
    )
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument(
        "--http-server",
        choices=["builtin", "uvicorn"],
        default="builtin",
        help="uvicorn: the Frontend serves the same app through bench/uvicorn_frontend.py",
    )
    # Anything else of the form --Service.key=value goes to `servegrid serve` as an override.
    args, overrides = parser.parse_known_args()
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --Service.key=value)")
    args.overrides = overrides

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    discovery = tempfile.mkdtemp(prefix="servegrid-bench-")
    env = {**os.environ, "SERVEGRID_DISCOVERY_DIR": discovery, "SERVEGRID_LOG_LEVEL": "WARNING"}
    if args.http_server == "uvicorn":  # its sitecustomize swaps the Frontend's server class
        path = [str(BENCH / "uvicorn_variant"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    command = [
        sys.executable, "-m", "servegrid.cli", "serve", "-f", args.config,
        f"--Frontend.port={port}", "--Frontend.host=127.0.0.1",
        f"--Worker.speedup-ratio={args.speedup}", f"--Worker.ServiceArgs.workers={args.workers}",
        *args.overrides,
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        time.sleep(1.0)  # let every worker register
        rows = asyncio.run(run_scenarios(args, url, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    if args.json:
        for values in rows:
            print(json.dumps(dict(zip(HEADERS, values, strict=True))))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{Path(args.config).name}: {args.workers} mocker workers x{args.speedup:g}, "
        f"c={args.concurrency}, {args.max_tokens} output tokens, {args.requests} requests each"
    )
    for header in HEADERS:
        table.add_column(header, justify="right")
    for values in rows:
        table.add_row(*values)
    Console(width=200).print(table)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
