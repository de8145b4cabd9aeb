"""The namespace a served graph runs in: what isolates one graph from another.

Chosen once by ``servegrid serve`` and written into every service's ``ServiceArgs.namespace``
in the config its processes receive:

1. a service's own ``ServiceArgs.namespace`` in the config;
2. ``--namespace`` / ``SERVEGRID_NAMESPACE``: set on purpose, so graphs that name the same
   namespace share their workers;
3. the namespace a service names in ``@service(namespace=...)`` (also on purpose);
4. otherwise a namespace of the graph's own: in embedded mode (file discovery, one host) a
   fresh one per ``servegrid serve``, so two graphs on one machine never serve each other's
   requests; in cluster mode (``ETCD_ENDPOINTS``) one derived from the graph reference and
   the config file's content, so every node serving the same config file joins one graph.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from servegrid.distributed import env
from servegrid.sdk.config import SERVICE_ARGS
from servegrid.sdk.errors import ConfigError
from servegrid.sdk.graph import Graph
from servegrid.sdk.service import DEFAULT_NAMESPACE

_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class GraphNamespace:
    name: str
    how: str  # a few words for the serve log: why this namespace


def check_namespace(name: str, where: str) -> str:
    if not _VALID.match(name):
        raise ConfigError(
            f"{where}: namespace {name!r} must be 1-63 letters, digits, '-' or '_' "
            "(it becomes part of discovery keys and NATS subjects)"
        )
    return name


def choose(graph_ref: str, yaml_config: dict[str, Any], explicit: str | None) -> GraphNamespace:
    """The graph's namespace for services that do not name their own."""
    if explicit:
        return GraphNamespace(check_namespace(explicit, "--namespace"), "set explicitly")
    if env.cluster_mode():
        canonical = json.dumps([graph_ref, yaml_config], sort_keys=True, default=str)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
        return GraphNamespace(
            f"{DEFAULT_NAMESPACE}-{digest}",
            "derived from the config: nodes serving this config file join this graph",
        )
    return GraphNamespace(
        f"{DEFAULT_NAMESPACE}-{secrets.token_hex(4)}",
        f"private to this serve; set --namespace or {env.SERVEGRID_NAMESPACE} to share workers",
    )


def apply(config: dict[str, Any], graph: Graph, namespace: GraphNamespace, explicit: bool) -> None:
    """Write each service's namespace into ``config`` (its ``ServiceArgs.namespace``)."""
    for spec in graph.services:
        section = config.setdefault(spec.name, {})
        args = section.setdefault(SERVICE_ARGS, {})
        if args.get("namespace"):
            check_namespace(str(args["namespace"]), f"{spec.name}.{SERVICE_ARGS}.namespace")
            continue
        if spec.namespace_explicit and not explicit:
            args["namespace"] = spec.namespace
        else:
            args["namespace"] = namespace.name
