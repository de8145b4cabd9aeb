"""Which address a process binds its listeners to, and which it advertises in discovery.

Embedded mode (no ``ETCD_ENDPOINTS``) keeps everything on loopback. Cluster mode binds all
interfaces and advertises the address that routes toward etcd, which is the interface the
other nodes share with this one.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

from servegrid.distributed import env

LOOPBACK = "127.0.0.1"


def endpoint_host(endpoint: str) -> str:
    """The host part of ``http://host:port``, ``host:port`` or ``host``."""
    text = endpoint.strip()
    if "://" not in text:
        text = "//" + text
    host = urlsplit(text).hostname
    return host or ""


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _route_source_address(target_host: str) -> str | None:
    """The local address the kernel would use to reach ``target_host``.

    ``connect`` on a UDP socket only selects a route and a source address: no packet is sent.
    """
    try:
        infos = socket.getaddrinfo(target_host, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(sockaddr)
                return sock.getsockname()[0]
        except OSError:
            continue
    return None


def _hostname_address() -> str | None:
    """A non-loopback address the host name resolves to, if any."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family=socket.AF_INET)
    except OSError:
        return None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if not _is_loopback(address):
            return address
    return None


def primary_address(toward: str | None = None) -> str:
    """This host's address as other nodes see it; loopback only if nothing else exists."""
    candidates: list[str | None] = []
    if toward:
        candidates.append(_route_source_address(toward))
    # A public address that is never contacted: only the routing table is consulted.
    candidates.append(_route_source_address("192.0.2.1"))
    candidates.append(_hostname_address())
    for address in candidates:
        if address and not _is_loopback(address):
            return address
    for address in candidates:
        if address:
            return address
    return LOOPBACK


def advertise_host() -> str:
    """The host to publish in discovery.

    ``SERVEGRID_ADVERTISE_HOST`` wins. In cluster mode: the source address of the route toward
    the first etcd endpoint, else an address of the host name; never loopback while another
    address exists, because a node that reaches etcd over loopback (the etcd node itself) is
    still reached by the others over its real interface. In embedded mode: 127.0.0.1.
    """
    explicit = os.environ.get(env.SERVEGRID_ADVERTISE_HOST, "").strip()
    if explicit:
        return explicit
    endpoints = env.etcd_endpoints()
    if not endpoints:
        return LOOPBACK
    return primary_address(endpoint_host(endpoints[0]) or None)


def bind_host() -> str:
    """The host to bind listeners to: ``SERVEGRID_BIND_HOST``, else all interfaces in cluster
    mode and loopback in embedded mode."""
    explicit = os.environ.get(env.SERVEGRID_BIND_HOST, "").strip()
    if explicit:
        return explicit
    return "0.0.0.0" if env.cluster_mode() else LOOPBACK
