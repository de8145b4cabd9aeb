"""``servegrid lora``: list the LoRA adapters a running graph's workers hold, load another.

The operator's route to the Worker's ``load_lora`` endpoint: it finds the workers through
discovery (etcd when ``ETCD_ENDPOINTS`` is set, else the file backend's directory, as
``servegrid status`` does) and calls them over the request plane, with the cluster secret the
environment gives, like any service. Nothing is exposed on the frontend's HTTP port: whoever
can load an adapter can make workers read files, so it takes request-plane access.

A loaded adapter is announced in the worker's discovery metadata: frontends list it in
``/v1/models`` and routers send its requests there at once, with no restart.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

import typer

from servegrid.distributed.discovery.base import KEY_ROOT, InstanceInfo, instance_prefix
from servegrid.engines.lora import adapters_of

#: the Worker endpoint this command calls
LOAD_ENDPOINT = "load_lora"
EXIT_FAILED = 1
EXIT_USAGE = 2

lora_app = typer.Typer(
    help="LoRA adapters of a running graph: list them, load one at run time.",
    no_args_is_help=True,
)


class LoraCommandError(Exception):
    """What went wrong, for one line on stderr."""


def _workers(entries: list[InstanceInfo], namespace: str | None) -> list[InstanceInfo]:
    """The instances serving ``load_lora`` in ``namespace`` (or in the one graph running)."""
    workers = [e for e in entries if e.endpoint == LOAD_ENDPOINT]
    namespaces = sorted({w.namespace for w in workers})
    if namespace is None:
        if len(namespaces) > 1:
            raise LoraCommandError(
                f"workers of several graphs are running ({', '.join(namespaces)}); "
                "name one with --namespace"
            )
    else:
        workers = [w for w in workers if w.namespace == namespace]
    if not workers:
        where = f"namespace {namespace!r}" if namespace else "discovery"
        raise LoraCommandError(
            f"no worker that loads LoRA adapters is registered in {where}; is the graph "
            "running, and does this shell see its discovery (ETCD_ENDPOINTS or "
            "SERVEGRID_DISCOVERY_DIR)?"
        )
    return sorted(workers, key=lambda w: (w.namespace, w.component, w.instance_id))


def _chosen(workers: list[InstanceInfo], wanted: list[str]) -> list[InstanceInfo]:
    if not wanted:
        return workers
    by_hex = {f"{w.instance_id:x}": w for w in workers}
    unknown = [w for w in wanted if w.lower() not in by_hex]
    if unknown:
        raise LoraCommandError(
            f"no such worker: {', '.join(unknown)} (workers: {', '.join(by_hex)}; "
            "see `servegrid lora list`)"
        )
    return [by_hex[w.lower()] for w in wanted]


async def _list_workers(runtime: Any, namespace: str | None) -> list[InstanceInfo]:
    prefix = instance_prefix(namespace) if namespace else f"{KEY_ROOT}/"
    return _workers(await runtime.discovery.list(prefix), namespace)


async def load_adapter(
    name: str, path: str, namespace: str | None, worker_hex: list[str]
) -> list[dict[str, Any]]:
    """Ask each chosen worker to load the adapter; one result per worker, in order."""
    from servegrid.distributed.runtime import DistributedRuntime

    runtime = await DistributedRuntime.from_env()
    try:
        targets = _chosen(await _list_workers(runtime, namespace), worker_hex)

        async def load(worker: InstanceInfo) -> dict[str, Any]:
            result: dict[str, Any] = {"worker": f"{worker.instance_id:x}", "ok": False}
            try:
                client = await runtime.client(worker.namespace, worker.component, LOAD_ENDPOINT)
                stream = await client.direct({"name": name, "path": path}, worker.instance_id)
                answer = await stream.single()
            except Exception as exc:  # one worker's failure is reported, the others go on
                result["error"] = str(exc) or type(exc).__name__
            else:
                result.update(ok=True, lora_adapters=answer.get("lora_adapters", []))
            return result

        return list(await asyncio.gather(*(load(w) for w in targets)))
    finally:
        await runtime.shutdown(drain_timeout=0)


async def list_adapters(namespace: str | None) -> list[dict[str, Any]]:
    from servegrid.distributed.runtime import DistributedRuntime

    runtime = await DistributedRuntime.from_env()
    try:
        return [
            {
                "namespace": w.namespace,
                "worker": f"{w.instance_id:x}",
                "model": w.metadata.get("model"),
                "lora_adapters": adapters_of(w.metadata),
            }
            for w in await _list_workers(runtime, namespace)
        ]
    finally:
        await runtime.shutdown(drain_timeout=0)


def _run(coroutine: Any) -> Any:
    from servegrid.distributed.discovery.etcd import EtcdUnavailableError

    try:
        return asyncio.run(coroutine)
    except LoraCommandError as exc:
        print(f"servegrid lora: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    except (EtcdUnavailableError, ValueError) as exc:  # etcd down, a malformed ETCD_ENDPOINTS
        print(f"servegrid lora: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


NamespaceOption = Annotated[
    str | None,
    typer.Option(
        "--namespace", "-n", help="The graph's namespace (default: the one graph running)."
    ),
]


@lora_app.command("load")
def load(
    name: Annotated[str, typer.Argument(help="The adapter's name: clients use it as `model`.")],
    path: Annotated[
        str, typer.Argument(help="Its PEFT directory, as a path on the workers' hosts.")
    ],
    namespace: NamespaceOption = None,
    worker: Annotated[
        list[str] | None,
        typer.Option("--worker", "-w", help="Only this worker (hex id; repeatable)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON results.")] = False,
) -> None:
    """Load a LoRA adapter on every worker of a running graph (or the ones named)."""
    results = _run(load_adapter(name, path, namespace, worker or []))
    if json_output:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["ok"]:
                loaded = ", ".join(r["lora_adapters"])
                print(f"worker {r['worker']}: loaded {name} (adapters: {loaded})")
            else:
                print(f"worker {r['worker']}: failed: {r['error']}", file=sys.stderr)
    if not all(r["ok"] for r in results):
        raise typer.Exit(EXIT_FAILED)


@lora_app.command("list")
def list_command(
    namespace: NamespaceOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show each worker's base model and the LoRA adapters it holds."""
    rows = _run(list_adapters(namespace))
    if json_output:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        adapters = ", ".join(row["lora_adapters"]) or "-"
        print(f"{row['namespace']}  worker {row['worker']}  {row['model']}  adapters: {adapters}")
