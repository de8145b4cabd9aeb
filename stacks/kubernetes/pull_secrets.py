"""Image pull secrets: the namespace's docker-registry secrets whose registry host matches.

A pod's image ``registry.example.com/team/servegrid:1.0`` gets every ``kubernetes.io/
dockerconfigjson`` (or legacy ``dockercfg``) secret of the namespace that holds credentials
for ``registry.example.com``. Parsing and matching are pure; listing the secrets is the one
call to the cluster (``list_registry_secrets``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = {
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
}
DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
DOCKERCFG = "kubernetes.io/dockercfg"


@dataclass(frozen=True)
class RegistrySecret:
    name: str
    hosts: frozenset[str]


def image_registry(image: str) -> str:
    """The registry host of an image reference (``nats:2.10`` is Docker Hub's)."""
    first, slash, _ = image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        return DOCKER_HUB
    return _canonical(first)


def auth_host(server: str) -> str:
    """The registry host of a docker config ``auths`` key (``https://index.docker.io/v1/``)."""
    return _canonical(server.split("://", 1)[-1].split("/", 1)[0])


def _canonical(host: str) -> str:
    host = host.lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def secret_hosts(secret_type: str, data: dict[str, str]) -> frozenset[str]:
    """Registry hosts a secret's (base64) data holds credentials for; empty if unreadable."""
    key = ".dockerconfigjson" if secret_type == DOCKERCONFIGJSON else ".dockercfg"
    try:
        config: dict[str, Any] = json.loads(base64.b64decode(data.get(key, "")))
    except ValueError:
        return frozenset()
    auths = config.get("auths", {}) if secret_type == DOCKERCONFIGJSON else config
    if not isinstance(auths, dict):
        return frozenset()
    return frozenset(auth_host(server) for server in auths)


def matching(image: str, secrets: list[RegistrySecret]) -> list[str]:
    host = image_registry(image)
    return sorted(s.name for s in secrets if host in s.hosts)


def pull_secrets_for(
    image: str, secrets: list[RegistrySecret], discovery: bool, named: list[str]
) -> list[str]:
    """The pod's ``imagePullSecrets`` names: discovered ones (unless off), then named ones."""
    found = matching(image, secrets) if discovery else []
    return found + [n for n in named if n not in found]


def list_registry_secrets(namespace: str) -> tuple[list[RegistrySecret], str | None]:
    """The namespace's docker-registry secrets, read with the current kubeconfig context.

    Returns the secrets and, when they could not be read (no kubeconfig, no such namespace
    yet, no permission), a sentence saying why, so the program can warn and go on without.
    """
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
    except ImportError:
        return [], "the kubernetes package is not installed (pip install -e '.[stacks]')"
    try:
        config.load_kube_config()
    except Exception as exc:  # no kubeconfig or no context: nothing to discover
        return [], f"no kubeconfig to read the namespace's secrets with ({exc})"
    try:
        items = client.CoreV1Api().list_namespaced_secret(namespace).items
    except ApiException as exc:
        return [], f"cannot list secrets of namespace {namespace!r}: {exc.status} {exc.reason}"
    except Exception as exc:  # unreachable API server
        return [], f"cannot reach the cluster to list secrets: {exc}"
    secrets = []
    for item in items:
        if item.type in (DOCKERCONFIGJSON, DOCKERCFG):
            hosts = secret_hosts(item.type, item.data or {})
            if hosts:
                secrets.append(RegistrySecret(item.metadata.name, hosts))
    return secrets, None
