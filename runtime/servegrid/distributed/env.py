"""Names of the environment variables the runtime reads, defined once."""

from __future__ import annotations

import os
from pathlib import Path

# Comma-separated etcd client URLs (``http://10.0.0.1:2379``) or ``host:port`` pairs. Set: cluster
# mode with etcd discovery. Unset: embedded mode with file discovery.
ETCD_ENDPOINTS = "ETCD_ENDPOINTS"
# NATS URL (``nats://10.0.0.1:4222``). Unset: ``servegrid serve`` starts a private nats-server.
NATS_SERVER = "NATS_SERVER"
# The address other processes use to reach this one (what goes into discovery).
SERVEGRID_ADVERTISE_HOST = "SERVEGRID_ADVERTISE_HOST"
# The address listeners bind to.
SERVEGRID_BIND_HOST = "SERVEGRID_BIND_HOST"
# Discovery lease time-to-live in seconds.
SERVEGRID_LEASE_TTL = "SERVEGRID_LEASE_TTL"
# Directory of the file discovery backend.
SERVEGRID_DISCOVERY_DIR = "SERVEGRID_DISCOVERY_DIR"
# The graph's namespace, set on purpose (``servegrid serve --namespace`` too); graphs naming
# the same one share workers. Unset, each embedded-mode ``servegrid serve`` gets one of its
# own, and in cluster mode it is derived from the config (see cli/namespace.py).
SERVEGRID_NAMESPACE = "SERVEGRID_NAMESPACE"
# The cluster secret (distributed/secret.py): the path of a file that holds it (owned by the
# user, mode 0600 or stricter), or the value itself. Set one of them, not both. Required when a
# request-plane listener binds a non-loopback address; NATS then authenticates with it too.
SERVEGRID_CLUSTER_SECRET_FILE = "SERVEGRID_CLUSTER_SECRET_FILE"
SERVEGRID_CLUSTER_SECRET = "SERVEGRID_CLUSTER_SECRET"
# Streams one request-plane connection may have open at once on a server (a positive integer);
# a request over it is answered with an error frame, the connection stays up.
SERVEGRID_MAX_STREAMS_PER_CONNECTION = "SERVEGRID_MAX_STREAMS_PER_CONNECTION"

# Set by `servegrid serve` for the processes it starts.
SERVEGRID_SERVICE_CONFIG = "SERVEGRID_SERVICE_CONFIG"
SERVEGRID_GRAPH = "SERVEGRID_GRAPH"
SERVEGRID_SERVICES = "SERVEGRID_SERVICES"
SERVEGRID_WORKER_INDEX = "SERVEGRID_WORKER_INDEX"
SERVEGRID_WORKING_DIR = "SERVEGRID_WORKING_DIR"
# Where the built-in model is built (default ``~/.cache/servegrid``).
SERVEGRID_HOME = "SERVEGRID_HOME"
# Log level of service processes (DEBUG, INFO, WARNING...).
SERVEGRID_LOG_LEVEL = "SERVEGRID_LOG_LEVEL"
# The GPUs a process may use (CUDA's own variable): `servegrid serve` sets it per process
# (cli/gpus.py) unless the user did; the vLLM engine counts it for tensor parallelism.
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

DEFAULT_LEASE_TTL = 10.0
# Far above what one caller has in flight to one worker (a frontend's connection cap is 2048),
# low enough that a buggy or hostile peer cannot start unbounded generations on one connection.
DEFAULT_MAX_STREAMS_PER_CONNECTION = 4096


def etcd_endpoints() -> list[str]:
    """The configured etcd endpoints, or an empty list in embedded mode."""
    raw = os.environ.get(ETCD_ENDPOINTS, "")
    return [part.strip() for part in raw.split(",") if part.strip()]


def cluster_mode() -> bool:
    """True when discovery is etcd (multi-node); False for the embedded single-host mode."""
    return bool(etcd_endpoints())


def lease_ttl() -> float:
    """``SERVEGRID_LEASE_TTL`` in seconds, or the default; a bad value is a clear error."""
    raw = os.environ.get(SERVEGRID_LEASE_TTL, "").strip()
    if not raw:
        return DEFAULT_LEASE_TTL
    try:
        ttl = float(raw)
    except ValueError:
        raise ValueError(
            f"{SERVEGRID_LEASE_TTL}={raw!r} is not a number; set it to seconds, e.g. 10"
        ) from None
    if ttl <= 0:
        raise ValueError(f"{SERVEGRID_LEASE_TTL}={raw!r} must be positive, e.g. 10")
    return ttl


def max_streams_per_connection() -> int:
    """``SERVEGRID_MAX_STREAMS_PER_CONNECTION``, or the default; a bad value is a ``SetupError``
    (entry points print it as one line)."""
    name = SERVEGRID_MAX_STREAMS_PER_CONNECTION
    raw = os.environ.get(name, "").strip()
    if not raw:
        return DEFAULT_MAX_STREAMS_PER_CONNECTION
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        from servegrid.distributed.errors import SetupError

        raise SetupError(
            f"{name}={raw!r} is not a positive integer; set it to the streams one connection "
            f"may have open at once, e.g. {DEFAULT_MAX_STREAMS_PER_CONNECTION}"
        )
    return value


def explicit_namespace() -> str | None:
    """``SERVEGRID_NAMESPACE`` if set (and not blank)."""
    return os.environ.get(SERVEGRID_NAMESPACE, "").strip() or None


def discovery_dir() -> Path:
    """The file discovery backend's directory: ``SERVEGRID_DISCOVERY_DIR`` or a per-user default.

    Whichever it is, ``FileDiscovery`` creates it 0700 and refuses one that another user owns
    or could write to (``distributed/private_dir.py``).
    """
    value = os.environ.get(SERVEGRID_DISCOVERY_DIR)
    if value:
        return Path(value)
    return Path(f"/tmp/servegrid-{os.getuid()}/discovery")
