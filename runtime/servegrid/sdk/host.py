"""Host services in this process: construct, start, serve, register; drain and stop.

A stop (SIGTERM or SIGINT) is graceful: the process leaves discovery first (callers stop
choosing it; it goes on serving for ``LEAVE_GRACE_S`` while their watches catch up), then
finishes what it has in flight, the request plane's streams and whatever
the services' ``@async_on_drain`` hooks hold (the Frontend's open HTTP streams), for up to
``ServiceArgs.drain-timeout`` seconds (default 30), and only then runs the shutdown hooks
and exits. Callers keep their connections to a draining process until their streams end.

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
from servegrid.distributed.errors import SetupError
from servegrid.distributed.runtime import DistributedRuntime
from servegrid.sdk.config import ServiceConfig
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.errors import UserError
from servegrid.sdk.graph import Graph, resolve_ref
from servegrid.sdk.layered_config import constructor_kwargs, effective_service_args
from servegrid.sdk.service import ServiceSpec, address, spec_of

log = logging.getLogger("servegrid.host")


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


async def republish_metadata(instance: Any) -> None:
    """Publish ``instance``'s metadata again after it changed (a worker loaded an adapter);
    a no-op for a service this process does not host through ``servegrid serve``."""
    runtime = servegrid_context.get("runtime")
    ids = servegrid_context.get("instance_ids") or {}
    instance_id = ids.get(spec_of(type(instance)).name)
    if runtime is None or instance_id is None:
        return
    await runtime.update_metadata(instance_id, _metadata(instance))


async def _call_hooks(hosted: HostedService, names: list[str]) -> None:
    for name in names:
        await getattr(hosted.instance, name)()


# After leaving discovery, go on serving this long before draining. A caller whose discovery
# watch has not yet seen us leave (the file backend polls every 0.2 s; an etcd watch crosses
# the network) may still send a request, on a pooled connection or a new one. Without it, a
# process with nothing in flight exited at once and such a request was cut: a 500 now and
# then in a rolling upgrade under load.
LEAVE_GRACE_S = 1.0


async def _drain(runtime: DistributedRuntime, hosted: list[HostedService], timeout: float) -> None:
    """Finish in-flight work (request plane and ``@async_on_drain`` hooks) within ``timeout``."""
    started = asyncio.get_running_loop().time()
    in_flight = runtime.server.in_flight  # counted as we left discovery: what the drain finishes
    grace = min(LEAVE_GRACE_S, timeout)
    if grace > 0:
        await asyncio.sleep(grace)
    rest = timeout - grace
    jobs: list[tuple[str, Awaitable[Any]]] = [("request plane", runtime.server.drain(rest))]
    for item in hosted:
        for name in item.spec.on_drain:
            jobs.append((f"{item.spec.name}.{name}", getattr(item.instance, name)(rest)))
    results = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
    for (what, _), result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            log.error("draining %s failed: %s", what, result)
    left = runtime.server.in_flight
    elapsed = asyncio.get_running_loop().time() - started
    if left:
        log.warning(
            "drain-timeout of %.0fs passed with %d request(s) still in flight; stopping anyway",
            timeout,
            left,
        )
    elif in_flight:
        log.info("drained %d in-flight request(s) in %.2fs", in_flight, elapsed)


async def host_services(
    specs: list[ServiceSpec],
    config: ServiceConfig,
    stop: asyncio.Event,
    graph: Graph | None = None,
) -> None:
    runtime = await DistributedRuntime.from_env()
    servegrid_context["runtime"] = runtime
    servegrid_context["worker_index"] = int(os.environ.get(env.SERVEGRID_WORKER_INDEX, "0"))
    if graph is not None:
        servegrid_context["graph"] = graph
    hosted: list[HostedService] = []
    drain_timeout = 0.0
    try:
        for spec in specs:
            args = effective_service_args(spec, config)
            drain_timeout = max(drain_timeout, float(args["drain-timeout"]))
            namespace, _ = address(spec.cls)
            instance = spec.cls(**constructor_kwargs(spec, config.settings(spec.name)))
            hosted.append(HostedService(spec, instance, namespace))
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
        log.info("stopping: leaving discovery, then draining for up to %.0fs", drain_timeout)
    finally:
        # Leave discovery first so callers stop choosing us, then let in-flight work finish.
        await runtime.unregister_all()
        await _drain(runtime, hosted, drain_timeout)
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
    graph = resolve_ref(graph_ref, working_dir=_working_dir())
    specs = []
    for name in names:
        spec = graph.get(name)
        if spec is None:
            raise UserError(
                f"service {name!r} is not in graph {graph_ref} ({', '.join(graph.names())})"
            )
        specs.append(spec)
    await host_until_signal(specs, config, graph)


def _working_dir() -> Any:
    from pathlib import Path

    value = os.environ.get(env.SERVEGRID_WORKING_DIR)
    return Path(value) if value else Path.cwd()


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get(env.SERVEGRID_LOG_LEVEL, "INFO").upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def host_until_signal(
    specs: list[ServiceSpec], config: ServiceConfig, graph: Graph | None = None
) -> None:
    """Host ``specs`` until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await host_services(specs, config, stop, graph)


def run_main(main_coroutine: Callable[[], Awaitable[None]]) -> None:
    """Run a process's async main on uvloop; a UserError is one line on stderr, exit 2."""
    setup_logging()
    install_uvloop()
    try:
        asyncio.run(main_coroutine())
    except (UserError, SetupError) as exc:
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
