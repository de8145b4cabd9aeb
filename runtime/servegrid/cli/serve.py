"""``servegrid serve``: start every service of a graph as supervised processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from servegrid.cli import gpus
from servegrid.cli import namespace as graph_namespace
from servegrid.cli.loader import LoadedGraph
from servegrid.cli.supervisor import ProcessSpec, Supervisor
from servegrid.distributed import env
from servegrid.distributed.errors import SetupError
from servegrid.sdk.errors import ConfigError, UserError
from servegrid.sdk.layered_config import effective_service_args

STOP_MARGIN_S = 5.0


def config_env_value(config: dict) -> str:
    return json.dumps(config, separators=(", ", ": "))


def print_dry_run(loaded: LoadedGraph) -> None:
    print("Service Configuration:")
    print(json.dumps(loaded.config, indent=2))
    print()
    print("Environment Variable that would be set:")
    print(f"{env.SERVEGRID_SERVICE_CONFIG}={config_env_value(loaded.config)}")


@dataclass
class ProcessGroup:
    """Services that run together in one process, ``workers`` copies of it."""

    services: list[str]
    workers: int
    gpus: int  # devices each copy needs (the most any of its services asks for)
    drain_timeout: float  # the longest any of its services may drain on a stop


def process_groups(loaded: LoadedGraph, service_names: list[str] | None) -> list[ProcessGroup]:
    """Which services share a process, and how many copies of it run.

    Services whose ``ServiceArgs.process`` names the same group run in one process (their
    ``depends`` calls become plain calls); each other service gets processes of its own.
    """
    graph = loaded.graph
    services = [graph.get(n) for n in service_names] if service_names else graph.services
    groups: dict[str, ProcessGroup] = {}
    for spec in services:
        assert spec is not None
        args = effective_service_args(spec, loaded.config)
        name = str(args.get("process") or spec.name)
        gpus = int((args.get("resources") or {}).get("gpu") or 0)
        drain = float(args["drain-timeout"])
        group = groups.get(name)
        if group is None:
            groups[name] = ProcessGroup([spec.name], args["workers"], gpus, drain)
            continue
        group.services.append(spec.name)
        group.drain_timeout = max(group.drain_timeout, drain)
        if group.workers != args["workers"]:
            raise ConfigError(
                f"services {', '.join(group.services)} share process {name!r} but ask for "
                f"different worker counts; give them the same ServiceArgs.workers"
            )
        group.gpus = max(group.gpus, gpus)
    return list(groups.values())


def process_specs(
    loaded: LoadedGraph, service_names: list[str] | None, working_dir: Path
) -> list[ProcessSpec]:
    base_env = {
        env.SERVEGRID_SERVICE_CONFIG: config_env_value(loaded.config),
        env.SERVEGRID_GRAPH: loaded.graph_ref,
        env.SERVEGRID_WORKING_DIR: str(working_dir),
        "PYTHONUNBUFFERED": "1",
    }
    specs: list[ProcessSpec] = []
    gpu_requests: list[tuple[str, int]] = []
    for group in process_groups(loaded, service_names):
        for index in range(group.workers):
            label = f"{'+'.join(group.services)}:{index}"
            gpu_requests.append((label, group.gpus))
            specs.append(
                ProcessSpec(
                    label=label,
                    argv=[sys.executable, "-m", "servegrid.sdk.host"],
                    env={
                        **base_env,
                        env.SERVEGRID_SERVICES: ",".join(group.services),
                        env.SERVEGRID_WORKER_INDEX: str(index),
                    },
                    cwd=str(working_dir),
                    # past its drain, a child gets a few seconds to exit before SIGKILL
                    stop_timeout=group.drain_timeout + STOP_MARGIN_S,
                )
            )
    if not gpus.user_chose_devices():
        devices, warnings = gpus.allocate(gpu_requests, gpus.detect_gpu_count())
        for warning in warnings:
            print(f"[servegrid] warning: {warning}", file=sys.stderr)
        for spec in specs:
            if spec.label in devices:
                spec.env[env.CUDA_VISIBLE_DEVICES] = devices[spec.label]
    return specs


async def _start_private_nats(stack: contextlib.AsyncExitStack, supervisor: Supervisor) -> str:
    """Start this graph's own nats-server on loopback (stopped, with its store, on exit)."""
    from servegrid.distributed.embedded_nats import (
        EmbeddedNats,
        NatsServerNotFoundError,
        NatsServerStartError,
    )

    if env.cluster_mode():
        # Every node would get its own private server and the event plane would split.
        supervisor.note(
            f"warning: {env.ETCD_ENDPOINTS} is set but {env.NATS_SERVER} is not; starting a "
            f"private nats-server that only this host's services see. Set "
            f"{env.NATS_SERVER}=nats://HOST:4222 on every node to share one."
        )
    from servegrid.distributed.secret import load_cluster_secret

    try:
        # With a cluster secret the private server requires it too, as a deployed one does.
        nats = await stack.enter_async_context(EmbeddedNats(password=load_cluster_secret()))
    except (NatsServerNotFoundError, NatsServerStartError) as error:
        raise UserError(
            f"{env.NATS_SERVER} is not set and the private nats-server could not start: {error}"
        ) from None
    supervisor.note(f"private nats-server at {nats.url} (pid {nats.pid})")
    return nats.url


async def _serve(specs: list[ProcessSpec], notes: list[str]) -> bool:
    """Run the processes until stopped; True if a child reported a configuration error."""
    async with contextlib.AsyncExitStack() as stack:
        supervisor = Supervisor(specs)
        for note in notes:
            supervisor.note(note)
        # Handlers first: a stop while the private server starts still removes it.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, supervisor.stop)
        if not os.environ.get(env.NATS_SERVER):
            url = await _start_private_nats(stack, supervisor)
            for spec in specs:
                spec.env[env.NATS_SERVER] = url
        labels = ", ".join(s.label for s in specs)
        supervisor.note(f"starting {len(specs)} process(es): {labels}; Ctrl-C stops them")
        await supervisor.run()
        supervisor.note("all processes stopped")
        return supervisor.failed


def check_cluster_secret() -> None:
    """Refuse, before starting anything, a cluster secret that is unsafe or missing where the
    services would listen beyond loopback (each service checks again when it starts)."""
    from servegrid.distributed.net import bind_host
    from servegrid.distributed.secret import load_cluster_secret, require_secret_for_bind

    try:
        require_secret_for_bind(bind_host(), load_cluster_secret() is not None)
        env.max_streams_per_connection()  # a bad value: refused here, not by every service
    except SetupError as error:
        raise UserError(str(error)) from None


def resolve_namespace(loaded: LoadedGraph, namespace: str | None) -> str:
    """Write the graph's namespace into ``loaded.config``; a line for the log."""
    explicit = namespace or env.explicit_namespace()
    chosen = graph_namespace.choose(loaded.graph_ref, loaded.yaml_config, explicit)
    graph_namespace.apply(loaded.config, loaded.graph, chosen, explicit=explicit is not None)
    used = sorted(
        {loaded.config[s.name]["ServiceArgs"]["namespace"] for s in loaded.graph.services}
    )
    return f"namespace {', '.join(used)} ({chosen.how})"


def run_serve(
    loaded: LoadedGraph,
    service_names: list[str] | None,
    working_dir: Path,
    namespace: str | None = None,
) -> None:
    check_cluster_secret()
    note = resolve_namespace(loaded, namespace)
    specs = process_specs(loaded, service_names, working_dir)
    if asyncio.run(_serve(specs, [note])):
        raise SystemExit(2)
