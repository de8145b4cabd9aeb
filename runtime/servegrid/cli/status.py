"""``servegrid status``: what is registered in discovery, as a table or as JSON.

The backend is the one the environment selects, as for services: etcd when ``ETCD_ENDPOINTS``
is set, else the file backend's directory. Reading never takes a lease, so looking does not
change what is seen.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated

import typer

from servegrid.distributed.backends import described_discovery_from_env
from servegrid.distributed.discovery.base import KEY_ROOT, Discovery, InstanceInfo, instance_prefix
from servegrid.distributed.discovery.base import now as wall_clock
from servegrid.distributed.errors import SetupError

EXIT_UNREACHABLE = 2


async def collect(discovery: Discovery, namespace: str | None) -> list[InstanceInfo]:
    """Every registered instance (of ``namespace``, if given), sorted for display."""
    prefix = instance_prefix(namespace) if namespace else f"{KEY_ROOT}/"
    try:
        entries = await discovery.list(prefix)
    finally:
        await discovery.close()
    # Other kinds of keys may share the root; keep instance entries only.
    entries = [e for e in entries if e.key.startswith(instance_prefix(e.namespace))]
    return sorted(entries, key=lambda e: (e.namespace, e.component, e.endpoint, e.instance_id))


def _age(registered_at: float, at: float) -> str:
    if not registered_at:
        return "?"
    seconds = max(0, int(at - registered_at))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def as_records(entries: list[InstanceInfo], at: float) -> list[dict]:
    return [
        {
            "namespace": e.namespace,
            "component": e.component,
            "endpoint": e.endpoint,
            "instance_id": f"{e.instance_id:x}",
            "host": e.host,
            "port": e.port,
            "address": f"{e.host}:{e.port}",
            "registered_at": e.registered_at,
            "age_seconds": round(at - e.registered_at, 3) if e.registered_at else None,
            "metadata": e.metadata,
        }
        for e in entries
    ]


def _print_table(entries: list[InstanceInfo], source: str, at: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not entries:
        console.print(f"nothing registered ({source})")
        return
    table = Table(title=f"registered instances ({source})", title_justify="left")
    for column in ("namespace", "component", "endpoint", "instance", "address", "age"):
        table.add_column(column, justify="right" if column == "age" else "left")
    for e in entries:
        table.add_row(
            e.namespace,
            e.component,
            e.endpoint,
            f"{e.instance_id:x}",
            f"{e.host}:{e.port}",
            _age(e.registered_at, at),
        )
    console.print(table)


def status(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON (a list of instances) instead of a table.")
    ] = False,
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Only this namespace.")
    ] = None,
) -> None:
    """List what is registered in discovery (etcd when ETCD_ENDPOINTS is set, else files)."""
    from servegrid.distributed.discovery.etcd import EtcdUnavailableError

    try:
        discovery, source = described_discovery_from_env()
        entries = asyncio.run(collect(discovery, namespace))
    except (EtcdUnavailableError, SetupError) as error:  # SetupError: an unsafe directory
        print(f"servegrid status: {error}", file=sys.stderr)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except ValueError as error:  # a malformed ETCD_ENDPOINTS or lease TTL
        print(f"servegrid status: {error}", file=sys.stderr)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    at = wall_clock()
    if json_output:
        print(json.dumps(as_records(entries, at), indent=2))
    else:
        _print_table(entries, source, at)
