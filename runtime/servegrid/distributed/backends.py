"""Choose the discovery backend and event plane from the environment.

etcd when ``ETCD_ENDPOINTS`` is set (cluster mode), else the file backend (one host).
NATS when ``NATS_SERVER`` is set; ``servegrid serve`` sets it to a private server it starts
when the user gave none.
"""

from __future__ import annotations

import os

from servegrid.distributed import env
from servegrid.distributed.discovery.base import Discovery


def parse_endpoints(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def discovery_from_env() -> Discovery:
    endpoints = os.environ.get(env.ETCD_ENDPOINTS, "")
    if endpoints:
        from servegrid.distributed.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(parse_endpoints(endpoints), ttl=env.lease_ttl())
    from servegrid.distributed.discovery.file import FileDiscovery

    return FileDiscovery(env.discovery_dir())


def nats_url_from_env() -> str | None:
    return os.environ.get(env.NATS_SERVER) or None
