"""``servegrid serve``: start every service of a graph as supervised processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from servegrid.cli.loader import LoadedGraph
from servegrid.cli.supervisor import ProcessSpec, Supervisor
from servegrid.distributed import env
from servegrid.sdk.layered_config import effective_service_args


def config_env_value(config: dict) -> str:
    return json.dumps(config, separators=(", ", ": "))


def print_dry_run(loaded: LoadedGraph) -> None:
    print("Service Configuration:")
    print(json.dumps(loaded.config, indent=2))
    print()
    print("Environment Variable that would be set:")
    print(f"{env.SERVEGRID_SERVICE_CONFIG}={config_env_value(loaded.config)}")


def process_specs(
    loaded: LoadedGraph, service_name: str | None, working_dir: Path
) -> list[ProcessSpec]:
    services = [loaded.graph.get(service_name)] if service_name else loaded.graph.services
    specs: list[ProcessSpec] = []
    base_env = {
        env.SERVEGRID_SERVICE_CONFIG: config_env_value(loaded.config),
        env.SERVEGRID_GRAPH: loaded.graph_ref,
        "SERVEGRID_WORKING_DIR": str(working_dir),
        "PYTHONUNBUFFERED": "1",
    }
    for spec in services:
        assert spec is not None
        workers = effective_service_args(spec, loaded.config)["workers"]
        for index in range(workers):
            specs.append(
                ProcessSpec(
                    label=f"{spec.name}:{index}",
                    argv=[sys.executable, "-m", "servegrid.sdk.host"],
                    env={
                        **base_env,
                        env.SERVEGRID_SERVICES: spec.name,
                        env.SERVEGRID_WORKER_INDEX: str(index),
                    },
                    cwd=str(working_dir),
                )
            )
    return specs


async def _serve(specs: list[ProcessSpec]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if not os.environ.get(env.NATS_SERVER):
            with contextlib.suppress(ImportError):
                from servegrid.distributed.embedded_nats import EmbeddedNats

                nats = await stack.enter_async_context(EmbeddedNats())
                for spec in specs:
                    spec.env[env.NATS_SERVER] = nats.url
        supervisor = Supervisor(specs)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, supervisor.stop)
        labels = ", ".join(s.label for s in specs)
        supervisor.note(f"starting {len(specs)} process(es): {labels}; Ctrl-C stops them")
        await supervisor.run()
        supervisor.note("all processes stopped")


def run_serve(loaded: LoadedGraph, service_name: str | None, working_dir: Path) -> None:
    specs = process_specs(loaded, service_name, working_dir)
    asyncio.run(_serve(specs))
