"""Choose the discovery backend and event plane from the environment.

etcd when ``ETCD_ENDPOINTS`` is set (cluster mode), else the file backend (one host).
NATS when ``NATS_SERVER`` is set; ``servegrid serve`` sets it to a private server it starts
when the user gave none.
"""

from __future__ import annotations

import os

from servegrid.distributed import env
from servegrid.distributed.discovery.base import Discovery


def discovery_from_env() -> Discovery:
    """The discovery backend the environment selects (services, ``servegrid status``...)."""
    return described_discovery_from_env()[0]


def described_discovery_from_env() -> tuple[Discovery, str]:
    """The backend, and where it looks (``etcd URL,...`` or ``file DIR``) for messages."""
    endpoints = env.etcd_endpoints()
    if endpoints:
        from servegrid.distributed.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(endpoints, ttl=env.lease_ttl()), "etcd " + ",".join(endpoints)
    from servegrid.distributed.discovery.file import FileDiscovery

    directory = env.discovery_dir()
    return FileDiscovery(directory), f"file {directory}"


def nats_url_from_env() -> str | None:
    return os.environ.get(env.NATS_SERVER) or None
