"""Names of the environment variables the runtime reads, defined once."""

from __future__ import annotations

import os
from pathlib import Path

ETCD_ENDPOINTS = "ETCD_ENDPOINTS"
NATS_SERVER = "NATS_SERVER"
SERVEGRID_ADVERTISE_HOST = "SERVEGRID_ADVERTISE_HOST"
SERVEGRID_BIND_HOST = "SERVEGRID_BIND_HOST"
SERVEGRID_LEASE_TTL = "SERVEGRID_LEASE_TTL"
SERVEGRID_DISCOVERY_DIR = "SERVEGRID_DISCOVERY_DIR"

# Set by `servegrid serve` for the processes it starts.
SERVEGRID_SERVICE_CONFIG = "SERVEGRID_SERVICE_CONFIG"
SERVEGRID_GRAPH = "SERVEGRID_GRAPH"
SERVEGRID_SERVICES = "SERVEGRID_SERVICES"
SERVEGRID_WORKER_INDEX = "SERVEGRID_WORKER_INDEX"


def cluster_mode() -> bool:
    """True when discovery is etcd (multi-node); False for the embedded single-host mode."""
    return bool(os.environ.get(ETCD_ENDPOINTS))


def discovery_dir() -> Path:
    value = os.environ.get(SERVEGRID_DISCOVERY_DIR)
    if value:
        return Path(value)
    return Path(f"/tmp/servegrid-{os.getuid()}/discovery")
