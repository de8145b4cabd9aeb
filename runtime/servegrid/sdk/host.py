"""Host services in this process: construct, start, serve, register; drain and stop.

``servegrid serve`` starts one process per service worker running ``python -m
servegrid.sdk.host``; the environment says which graph, which service(s) and which worker.
Several services may share one process (``SERVEGRID_SERVICES=Frontend,Processor``): their
``depends`` calls to each other are then plain method calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from servegrid.distributed import env
from servegrid.distributed.runtime import DistributedRuntime
from servegrid.sdk.config import ServiceConfig
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.errors import UserError
from servegrid.sdk.graph import import_service, resolve
from servegrid.sdk.layered_config import constructor_kwargs, effective_service_args
from servegrid.sdk.service import ServiceSpec

log = logging.getLogger("servegrid.host")

DRAIN_TIMEOUT = float(os.environ.get("SERVEGRID_DRAIN_TIMEOUT", "10"))


class HostedService:
    def __init__(self, spec: ServiceSpec, instance: Any, namespace: str) -> None:
        self.spec = spec
        self.instance = instance
        self.namespace = namespace
        self.instance_id = secrets.randbits(63)


def _metadata(instance: Any) -> dict[str, Any]:
    """What discovery stores with each endpoint: pid and worker, plus the service's own
    ``instance_metadata()`` (e.g. the model a worker serves)."""
    metadata: dict[str, Any] = {"pid": os.getpid(), "worker": servegrid_context["worker_index"]}
    extra = getattr(instance, "instance_metadata", None)
    if callable(extra):
        metadata.update(extra())
    return metadata


async def _call_hooks(hosted: HostedService, names: list[str]) -> None:
    for name in names:
        await getattr(hosted.instance, name)()


async def host_services(
    specs: list[ServiceSpec], config: ServiceConfig, stop: asyncio.Event
) -> None:
    runtime = await DistributedRuntime.from_env()
    servegrid_context["runtime"] = runtime
    servegrid_context["worker_index"] = int(os.environ.get(env.SERVEGRID_WORKER_INDEX, "0"))
    hosted: list[HostedService] = []
    try:
        for spec in specs:
            args = effective_service_args(spec, config)
            instance = spec.cls(**constructor_kwargs(spec, config.settings(spec.name)))
            hosted.append(HostedService(spec, instance, args["namespace"]))
            servegrid_context.setdefault("instance_ids", {})[spec.name] = hosted[-1].instance_id
            servegrid_context.local_services[spec.name] = instance
        for item in hosted:
            await _call_hooks(item, item.spec.on_start)
        for item in hosted:
            for ep in item.spec.endpoints.values():
                await runtime.serve_endpoint(
                    item.namespace,
                    item.spec.name,
                    ep.name,
                    getattr(item.instance, ep.method_name),
                    instance_id=item.instance_id,
                    request_type=ep.request_type,
                    streaming=ep.streaming,
                    metadata=_metadata(item.instance),
                )
            log.info(
                "%s ready: instance %x, endpoints [%s] on %s:%d",
                item.spec.name,
                item.instance_id,
                ", ".join(item.spec.endpoints),
                runtime.advertise_host,
                runtime.server.port,
            )
        await stop.wait()
    finally:
        # Leave discovery first so callers stop choosing us, then let in-flight work finish.
        await runtime.unregister_all()
        await runtime.server.drain(DRAIN_TIMEOUT)
        for item in reversed(hosted):
            try:
                await _call_hooks(item, item.spec.on_shutdown)
            except Exception:
                log.exception("shutdown hook of %s failed", item.spec.name)
        await runtime.shutdown(drain_timeout=0)
        servegrid_context.clear()


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _main() -> None:
    graph_ref = os.environ[env.SERVEGRID_GRAPH]
    names = [n for n in os.environ[env.SERVEGRID_SERVICES].split(",") if n]
    config = ServiceConfig.get_instance()
    entry = import_service(graph_ref, working_dir=_working_dir())
    graph = resolve(entry)
    specs = []
    for name in names:
        spec = graph.get(name)
        if spec is None:
            raise UserError(
                f"service {name!r} is not in graph {graph_ref} ({', '.join(graph.names())})"
            )
        specs.append(spec)
    await host_until_signal(specs, config)


def _working_dir() -> Any:
    from pathlib import Path

    value = os.environ.get("SERVEGRID_WORKING_DIR")
    return Path(value) if value else Path.cwd()


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SERVEGRID_LOG_LEVEL", "INFO").upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def host_until_signal(specs: list[ServiceSpec], config: ServiceConfig) -> None:
    """Host ``specs`` until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await host_services(specs, config, stop)


def run_main(main_coroutine: Callable[[], Awaitable[None]]) -> None:
    """Run a process's async main on uvloop; a UserError is one line on stderr, exit 2."""
    setup_logging()
    install_uvloop()
    try:
        asyncio.run(main_coroutine())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ConnectionError as exc:
        # etcd or NATS unreachable at start: transient, so exit 1 and let the supervisor
        # (or the node's service manager) start us again with backoff.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    run_main(_main)


if __name__ == "__main__":
    main()
