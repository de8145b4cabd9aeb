"""The Kubernetes stack's config keys (namespace ``servegrid-k8s``), typed and checked."""

from __future__ import annotations

from typing import Literal

import pydantic

from servegrid.sdk.service import DEFAULT_NAMESPACE
from stacks.config import StackSettings

PROJECT = "servegrid-k8s"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class Rdma(StackSettings):
    """An RDMA device plugin resource, e.g. ``rdma/rdma_shared_device_a`` (count per pod)."""

    resource: str = pydantic.Field(pattern=r"^[a-z0-9.-]+/[A-Za-z0-9_.-]+$")
    count: int = pydantic.Field(1, ge=1)


class Component(StackSettings):
    """Per process group (``frontend``) or service (``Worker``) settings."""

    image: str | None = None
    # Off: no discovery; only ``imagePullSecrets`` are used.
    pull_secret_discovery: bool = True
    image_pull_secrets: list[str] = []
    rdma: Rdma | None = None


class Storage(StackSettings):
    image: str
    size: str = pydantic.Field("10Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$")
    storage_class: str | None = None


class FrontendService(StackSettings):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    # Unset: the graph config's Frontend.port.
    port: int | None = pydantic.Field(None, ge=1, le=65535)


class KubernetesSettings(StackSettings):
    graph_config: str
    namespace: str = pydantic.Field("servegrid", pattern=DNS_LABEL)
    # The graph's namespace in discovery (SERVEGRID_NAMESPACE on every pod).
    graph_namespace: str = DEFAULT_NAMESPACE
    image: str
    components: dict[str, Component] = {}
    frontend_service: FrontendService = FrontendService()
    etcd: Storage = Storage(image="quay.io/coreos/etcd:v3.5.17", size="2Gi")
    nats: Storage = Storage(image="nats:2.10-alpine", size="10Gi")
    # How long a service may take to start (load a model) before its liveness probe counts.
    startup_seconds: int = pydantic.Field(600, ge=10)
