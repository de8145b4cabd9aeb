"""Components started alone from flags (`python -m servegrid.frontend / servegrid.worker`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from servegrid.distributed.embedded_nats import free_port
from tests.support.procs import wait_gone
from tests.support.serving import SERVEGRID


def start(module: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:

    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_frontend_and_worker_from_flags_serve_a_local_model_directory(tmp_path: Path):
    """`servegrid model init DIR` makes a Hugging Face-format directory; any such directory
    serves the same way as the built-in model."""
    model_dir = tmp_path / "my-model"
    made = subprocess.run(
        [*SERVEGRID, "model", "init", str(model_dir)], capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    assert (model_dir / "tokenizer.json").is_file()
    assert (model_dir / "tokenizer_config.json").is_file()
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    port = free_port()
    model = ["--model", str(model_dir)]
    worker = start(
        "servegrid.worker", ["--engine", "mocker", "--speedup-ratio", "100", *model], env
    )
    frontend = start(
        "servegrid.frontend",
        ["--http-port", str(port), "--http-host", "127.0.0.1", "--router-mode", "random", *model],
        env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert worker.poll() is None and frontend.poll() is None, "a component exited"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "frontend never became healthy"
            time.sleep(0.1)
        served = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]]
        assert served == [str(model_dir)]
        body = {"model": str(model_dir), "prompt": "Once upon a time", "max_tokens": 7}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
        assert reply["usage"]["completion_tokens"] == 7
    finally:
        outputs = [stop(worker), stop(frontend)]
    assert wait_gone([worker.pid, frontend.pid], 5) == []
    assert all(p.returncode == 0 for p in (worker, frontend)), outputs


def test_an_unknown_router_mode_is_a_clear_error(tmp_path: Path):
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    proc = start("servegrid.frontend", ["--http-port", "0", "--router-mode", "sideways"], env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "router mode 'sideways' is not one of: random, round-robin" in out
    assert "Traceback" not in out


def test_serve_stops_the_graph_when_a_service_rejects_its_config(tmp_path: Path):
    from tests.system.test_openai_graph import AGG

    result = subprocess.run(
        [*SERVEGRID, "serve", "-f", AGG, "--Processor.router=sideways", "--Frontend.port=0"],
        env={**os.environ, "SERVEGRID_DISCOVERY_DIR": str(tmp_path / "d")},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "router mode 'sideways'" in result.stdout
    assert "stopped on a configuration error" in result.stdout
    assert result.stdout.count("died with") == 0  # no restart loop
