"""The cluster secret: where a process finds it, what a valid one looks like, and when it is
required.

Every servegrid process of a cluster holds the same secret, from ``SERVEGRID_CLUSTER_SECRET_FILE``
(a file owned by the user, mode 0600 or stricter, whose content, stripped of surrounding
whitespace, is the secret) or ``SERVEGRID_CLUSTER_SECRET`` (the value). It is used for:

- the request-plane handshake (``transport/handshake.py``): HMAC challenge-response in both
  directions, so the secret never crosses the wire;
- NATS: user ``servegrid`` with the secret as password, when ``NATS_SERVER`` carries no
  credentials of its own (``nats_plane.py``; the private nats-server of ``servegrid serve`` is
  configured the same way).

A request-plane server that binds a non-loopback address refuses to start without a secret.
"Loopback" means an IP address in 127.0.0.0/8 or ``::1``, or a host name all of whose
addresses are such; the wildcard ``0.0.0.0`` / ``::`` (every interface) is not loopback.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import string
from collections.abc import Mapping
from pathlib import Path

from servegrid.distributed import env
from servegrid.distributed.errors import ClusterSecretError, UnsafePathError
from servegrid.distributed.private_dir import check_private_file, write_private_file

NATS_USER = "servegrid"
MIN_LENGTH = 16
# Printable ASCII without whitespace, quotes or backslash: the secret is also a NATS password
# that goes into nats-server's config file, and Ansible's password lookup stays inside this set.
ALLOWED_CHARACTERS = frozenset(
    string.ascii_letters + string.digits + "!#$%&()*+,-./:;<=>?@[]^_{|}~"
)
GENERATED_BYTES = 32  # token_urlsafe(32): 43 characters, 256 bits

HOW_TO_SET = (
    f"set {env.SERVEGRID_CLUSTER_SECRET_FILE}=PATH (a file of yours, mode 0600, holding the "
    f"same secret on every node; `servegrid secret init PATH` writes one) or "
    f"{env.SERVEGRID_CLUSTER_SECRET}=VALUE"
)


def _validate(value: str, source: str) -> str:
    secret = value.strip()
    if len(secret) < MIN_LENGTH:
        raise ClusterSecretError(
            f"the cluster secret from {source} has {len(secret)} characters; it needs at least "
            f"{MIN_LENGTH} (`servegrid secret init PATH` writes a good one)"
        )
    bad = sorted(set(secret) - ALLOWED_CHARACTERS)
    if bad:
        raise ClusterSecretError(
            f"the cluster secret from {source} contains {''.join(bad)!r}; use letters, digits "
            f"and punctuation other than quotes and backslash (no spaces)"
        )
    return secret


def load_cluster_secret(environ: Mapping[str, str] | None = None) -> str | None:
    """The secret from the environment, or None when neither variable is set.

    A file that is not the user's, or that group or others may read, is refused; so is a
    short secret, and setting both variables.
    """
    environ = os.environ if environ is None else environ
    path_value = environ.get(env.SERVEGRID_CLUSTER_SECRET_FILE, "").strip()
    value = environ.get(env.SERVEGRID_CLUSTER_SECRET, "")
    if path_value and value.strip():
        raise ClusterSecretError(
            f"both {env.SERVEGRID_CLUSTER_SECRET_FILE} and {env.SERVEGRID_CLUSTER_SECRET} are "
            f"set; set only one of them"
        )
    if path_value:
        path = Path(path_value)
        what = f"the cluster secret file ({env.SERVEGRID_CLUSTER_SECRET_FILE})"
        try:
            check_private_file(path, what)
            text = path.read_text(encoding="ascii")
        except UnsafePathError as error:
            raise ClusterSecretError(str(error)) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ClusterSecretError(f"cannot read {what} {path}: {error}") from None
        return _validate(text, f"{env.SERVEGRID_CLUSTER_SECRET_FILE}={path}")
    if value.strip():
        return _validate(value, env.SERVEGRID_CLUSTER_SECRET)
    return None


def is_loopback_host(host: str) -> bool:
    """True when ``host`` is a loopback address, or a name that resolves only to such."""
    host = host.strip().strip("[]")
    if not host:
        return False  # "" binds every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def require_secret_for_bind(host: str, has_secret: bool) -> None:
    """Refuse to listen beyond loopback without a secret: anyone who could reach the port
    could otherwise make this process generate."""
    if not has_secret and not is_loopback_host(host):
        shown = host or "0.0.0.0"
        raise ClusterSecretError(
            f"the request plane would listen on {shown}, beyond loopback, without a cluster "
            f"secret: any host that reaches the port could send it requests; {HOW_TO_SET}. "
            f"To stay on this host instead, set {env.SERVEGRID_BIND_HOST}=127.0.0.1"
        )


def generate_secret() -> str:
    return secrets.token_urlsafe(GENERATED_BYTES)


def write_secret_file(path: Path, *, force: bool = False) -> Path:
    """Write a new random secret to ``path`` with mode 0600; an existing file needs ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise ClusterSecretError(
            f"{path} exists; keep it (every node must share one secret) or pass --force"
        )
    if not path.parent.is_dir():
        raise ClusterSecretError(f"{path.parent} is not a directory; create it first")
    write_private_file(path, (generate_secret() + "\n").encode("ascii"))
    return path
