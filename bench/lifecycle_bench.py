"""What a stop, a kill and a drain do to streams in flight, measured on one host.

    python bench/lifecycle_bench.py [--streams 20] [--max-tokens 300]

Serves configs/agg.yaml (two mocker workers, speedup 1: a few ms a token) on a free port with
its own discovery directory, and runs three scenarios, each on a fresh graph:

- ``sigterm-worker``: SIGTERM to Worker:0 with the streams in flight;
- ``sigkill-worker``: SIGKILL of Worker:1 with the streams in flight (migration);
- ``sigterm-serve``: SIGTERM to ``servegrid serve`` with the streams in flight.

For each it prints: streams completed (finish_reason + all tokens), streams moved to another
worker (the Processor's log), the longest gap between two events of a stream (the pause a
migration adds, against the same figure without a fault), and for ``sigterm-serve`` the
seconds from SIGTERM to the exit of ``servegrid serve``. Bounded: one batch of streams per
scenario, every request with a timeout.
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
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from servegrid.distributed.embedded_nats import free_port  # noqa: E402

MODEL = "servegrid/tiny-chat"


class Graph:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="servegrid-lifecycle-")
        self.lines: list[str] = []
        args = [
            sys.executable,
            "-m",
            "servegrid.cli",
            "serve",
            "-f",
            str(REPO / "configs/agg.yaml"),
        ]
        args += [f"--Frontend.port={self.port}", "--Frontend.host=127.0.0.1"]
        args += ["--Worker.speedup-ratio=1"]
        env = {**os.environ, "SERVEGRID_DISCOVERY_DIR": self.dir, "NO_COLOR": "1"}
        env["PYTHONPATH"] = str(REPO / "runtime")
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count("Worker ready") >= 2:
                try:
                    data = httpx.get(f"{self.url}/v1/models", timeout=2).json()["data"]
                    if data:
                        return
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
            time.sleep(0.1)
        raise SystemExit(f"graph not ready:\n{self.text()[-2000:]}")

    def worker_pid(self, label: str) -> int:
        for pid in _children(self.proc.pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if (
                values.get(b"SERVEGRID_SERVICES") == label.split(":")[0].encode()
                and values.get(b"SERVEGRID_WORKER_INDEX") == label.split(":")[1].encode()
            ):
                return pid
        raise SystemExit(f"no {label} under serve")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


async def one_stream(http: httpx.AsyncClient, url: str, seed: int, max_tokens: int, started):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"story {seed}"}],
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = {"complete": False, "max_gap_s": 0.0, "error": None}
    last = None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                if last is not None:
                    result["max_gap_s"] = max(result["max_gap_s"], now - last)
                last = now
                started.set()
                event = json.loads(line[6:])
                if "error" in event:
                    result["error"] = event["error"]["code"]
                usage = event.get("usage")
                if usage and usage["completion_tokens"] == max_tokens:
                    result["complete"] = True
    except httpx.HTTPError as exc:
        result["error"] = type(exc).__name__
    finally:
        started.set()
    return result


async def scenario(name: str, streams: int, max_tokens: int) -> dict:
    graph = Graph()
    try:
        graph.wait_ready()
        async with httpx.AsyncClient(timeout=120) as http:
            events = [asyncio.Event() for _ in range(streams)]
            tasks = [
                asyncio.create_task(one_stream(http, graph.url, i, max_tokens, events[i]))
                for i in range(streams)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            signalled = time.monotonic()
            if name == "sigterm-worker":
                os.kill(graph.worker_pid("Worker:0"), signal.SIGTERM)
            elif name == "sigkill-worker":
                os.kill(graph.worker_pid("Worker:1"), signal.SIGKILL)
            elif name == "sigterm-serve":
                graph.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
        exit_s = None
        if name == "sigterm-serve":
            await asyncio.to_thread(graph.proc.wait, 60)
            exit_s = round(time.monotonic() - signalled, 2)
        gaps = sorted(r["max_gap_s"] for r in results)
        return {
            "scenario": name,
            "streams": streams,
            "completed": sum(r["complete"] for r in results),
            "errors": sorted({r["error"] for r in results if r["error"]}),
            "moved": graph.text().count("continuing on worker"),
            "max_gap_p50_ms": round(gaps[len(gaps) // 2] * 1000, 1),
            "max_gap_max_ms": round(gaps[-1] * 1000, 1),
            "serve_exit_after_sigterm_s": exit_s,
        }
    finally:
        graph.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=["baseline", "sigterm-worker", "sigkill-worker", "sigterm-serve"],
    )
    args = parser.parse_args()
    names = args.scenario or ["baseline", "sigterm-worker", "sigkill-worker", "sigterm-serve"]
    for name in names:
        print(json.dumps(await scenario(name, args.streams, args.max_tokens)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
