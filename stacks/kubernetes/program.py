"""The Kubernetes stack's resources: namespace, secrets, etcd and NATS, the graph's services.

Each of ``servegrid serve``'s process groups becomes one Deployment with ``workers`` replicas,
one copy per pod. The graph config goes into a ConfigMap without its worker counts, so
scaling one service changes that Deployment's replicas and nothing else. Everything is
checked before the first resource is declared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import yaml

from servegrid.distributed import env
from stacks.config import config_values, read_settings, resolve_path
from stacks.errors import StackConfigError
from stacks.graph import GraphPlan, ProcessGroup, dns_label, load_graph_plan
from stacks.kubernetes.commands import CONFIG_DIR, CONFIG_FILE, Launch, launch_command
from stacks.kubernetes.pull_secrets import (
    RegistrySecret,
    list_registry_secrets,
    pull_secrets_for,
)
from stacks.kubernetes.settings import PROJECT, Component, KubernetesSettings, Storage

PROGRAM_DIR = Path(__file__).resolve().parent
GPU_RESOURCE = "nvidia.com/gpu"
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
NATS_PORT, NATS_MONITOR_PORT = 4222, 8222
NATS_USER = "servegrid"  # the user the runtime authenticates as with the cluster secret
SECRET_KEY = "secret"
PROBE_PERIOD = 10
# the runtime's own components: settings for one absent from the graph are ignored, not errors
BUILT_IN_SERVICES = frozenset({"Frontend", "Processor", "Router", "Worker", "PrefillWorker"})
SecretLister = Callable[[str], tuple[list[RegistrySecret], str | None]]


@dataclass
class KubernetesStack:
    settings: KubernetesSettings
    graph: GraphPlan
    deployments: dict[str, k8s.apps.v1.Deployment]
    frontend_service: k8s.core.v1.Service | None


def load_settings(values: dict[str, str | None] | None = None) -> KubernetesSettings:
    return read_settings(
        KubernetesSettings,
        PROJECT,
        values if values is not None else config_values(KubernetesSettings, PROJECT),
    )


def build(
    settings: KubernetesSettings | None = None,
    list_secrets: SecretLister = list_registry_secrets,
) -> KubernetesStack:
    settings = settings or load_settings()
    cluster_secret = pulumi.Config(PROJECT).get_secret("clusterSecret")
    if cluster_secret is None:
        raise StackConfigError(
            f"{PROJECT}:clusterSecret is not set: the services and NATS need the cluster "
            f"secret; set one with `pulumi config set --secret {PROJECT}:clusterSecret "
            '"$(openssl rand -hex 32)"`'
        )
    graph = load_graph_plan(resolve_path(settings.graph_config, PROGRAM_DIR), PROGRAM_DIR)
    components = _components(settings, graph)
    launches = {group.name: launch_command(graph, group) for group in graph.groups}
    registry_secrets, why_not = list_secrets(settings.namespace)
    if why_not:
        pulumi.log.warn(f"image pull secrets: none discovered, {why_not}")
    # -- nothing is declared above this line --
    ns_name = settings.namespace
    namespace = k8s.core.v1.Namespace(
        ns_name, metadata=k8s.meta.v1.ObjectMetaArgs(name=ns_name, labels=_labels("namespace"))
    )
    opts = pulumi.ResourceOptions(depends_on=[namespace])

    def meta(name: str, component: str) -> k8s.meta.v1.ObjectMetaArgs:
        return k8s.meta.v1.ObjectMetaArgs(name=name, namespace=ns_name, labels=_labels(component))

    secret = k8s.core.v1.Secret(
        f"{ns_name}-cluster-secret",
        metadata=meta("servegrid-cluster-secret", "cluster-secret"),
        type="Opaque",
        string_data={SECRET_KEY: cluster_secret},
        opts=opts,
    )
    nats_conf = cluster_secret.apply(lambda value: _nats_conf(settings.nats, value))
    nats_secret = k8s.core.v1.Secret(
        f"{ns_name}-nats-config",
        metadata=meta("nats-config", "nats"),
        type="Opaque",
        string_data={"nats.conf": pulumi.Output.secret(nats_conf)},
        opts=opts,
    )
    config_text = yaml.safe_dump(graph.placement_free_yaml(), sort_keys=False)
    k8s.core.v1.ConfigMap(
        f"{ns_name}-graph-config",
        metadata=meta("servegrid-graph-config", "config"),
        data={CONFIG_FILE: config_text},
        opts=opts,
    )

    def pull_secrets(image: str, component: Component | None = None) -> list[dict[str, str]]:
        chosen = pull_secrets_for(
            image,
            registry_secrets,
            component.pull_secret_discovery if component else True,
            component.image_pull_secrets if component else [],
        )
        return [{"name": name} for name in chosen]

    _etcd(ns_name, settings.etcd, meta, pull_secrets, opts)
    _nats(ns_name, settings.nats, meta, pull_secrets, nats_secret, opts)

    service_env = [
        _env(env.ETCD_ENDPOINTS, f"http://etcd.{ns_name}.svc:{ETCD_CLIENT_PORT}"),
        # no credentials in the URL: the runtime logs in as NATS_USER with the cluster secret
        _env(env.NATS_SERVER, f"nats://nats.{ns_name}.svc:{NATS_PORT}"),
        _env(env.SERVEGRID_NAMESPACE, settings.graph_namespace),
        {
            "name": env.SERVEGRID_ADVERTISE_HOST,
            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
        },
        {
            "name": env.SERVEGRID_CLUSTER_SECRET,
            "valueFrom": {"secretKeyRef": {"name": "servegrid-cluster-secret", "key": SECRET_KEY}},
        },
    ]
    config_hash = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    deployments: dict[str, k8s.apps.v1.Deployment] = {}
    frontend_port = None
    for group in graph.groups:
        component = components.get(group.name)
        image = (component.image if component and component.image else None) or settings.image
        port = _frontend_port(graph, group)
        if port is not None:
            frontend_port = port
        deployments[group.name] = _deployment(
            ns_name,
            group,
            launches[group.name],
            image,
            component,
            port,
            settings,
            service_env,
            config_hash,
            pull_secrets(image, component),
            meta,
            [secret],
        )
    frontend_service = None
    if frontend_port is not None:
        frontend = next(g for g in graph.groups if _frontend_port(graph, g) is not None)
        frontend_service = k8s.core.v1.Service(
            f"{ns_name}-frontend",
            metadata=meta("frontend", "frontend"),
            spec={
                "type": settings.frontend_service.type,
                "selector": _selector(dns_label(frontend.name)),
                "ports": [
                    {
                        "name": "http",
                        "port": settings.frontend_service.port or frontend_port,
                        "targetPort": "http",
                        "protocol": "TCP",
                    }
                ],
            },
            opts=opts,
        )
    return KubernetesStack(settings, graph, deployments, frontend_service)


def export(stack: KubernetesStack) -> None:
    pulumi.export("namespace", stack.settings.namespace)
    pulumi.export("deployments", {g: d.metadata.name for g, d in stack.deployments.items()})
    if stack.frontend_service is not None:
        pulumi.export("frontendService", stack.frontend_service.metadata.name)


def _components(settings: KubernetesSettings, graph: GraphPlan) -> dict[str, Component]:
    """Component settings by process group; a key may name the group or one of its services."""
    by_group: dict[str, Component] = {}
    for key, component in settings.components.items():
        group = next((g for g in graph.groups if key == g.name or key in g.services), None)
        if group is None and key in BUILT_IN_SERVICES:
            # e.g. Router settings kept while trying a graph without a Router
            pulumi.log.warn(f"{PROJECT}:components.{key}: not in graph {graph.graph_ref}; unused")
            continue
        if group is None:
            names = {g.name for g in graph.groups} | set(graph.loaded.graph.names())
            raise StackConfigError(
                f"{PROJECT}:components.{key}: no process group or service {key!r} in graph "
                f"config {graph.path} (known: {', '.join(sorted(names))})"
            )
        if group.name in by_group:
            raise StackConfigError(
                f"{PROJECT}:components: two entries configure process group {group.name!r}; "
                "keep one"
            )
        by_group[group.name] = component
    return by_group


def _labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "servegrid",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def _selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "servegrid", "app.kubernetes.io/component": component}


def _env(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value}


def _frontend_port(graph: GraphPlan, group: ProcessGroup) -> int | None:
    if "Frontend" not in group.services:
        return None
    return int(graph.settings("Frontend").get("port", 8000))


def _deployment(
    ns_name: str,
    group: ProcessGroup,
    launch: Launch,
    image: str,
    component: Component | None,
    http_port: int | None,
    settings: KubernetesSettings,
    service_env: list[dict[str, Any]],
    config_hash: str,
    pull_secrets: list[dict[str, str]],
    meta: Callable[[str, str], k8s.meta.v1.ObjectMetaArgs],
    depends_on: list[pulumi.Resource],
) -> k8s.apps.v1.Deployment:
    name = dns_label(group.name)
    limits: dict[str, str] = {}
    if group.gpus:
        limits[GPU_RESOURCE] = str(group.gpus)
    security: dict[str, Any] = {"allowPrivilegeEscalation": False}
    if component and component.rdma:
        limits[component.rdma.resource] = str(component.rdma.count)
        # RDMA registers (pins) memory: the process needs to lock it.
        security["capabilities"] = {"add": ["IPC_LOCK"]}
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "command": launch.args,
        "env": service_env,
        "securityContext": security,
    }
    if limits:
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    startup_failures = max(1, settings.startup_seconds // PROBE_PERIOD)
    if http_port is not None:
        container["ports"] = [{"name": "http", "containerPort": http_port, "protocol": "TCP"}]
        check: dict[str, Any] = {"httpGet": {"path": "/health", "port": "http"}}
    else:
        probe = [
            "python",
            "-m",
            "servegrid.cli.probe",
            *group.services,
            "--namespace",
            settings.graph_namespace,
        ]
        check = {"exec": {"command": probe}, "timeoutSeconds": 5}
    container["startupProbe"] = {
        **check,
        "periodSeconds": PROBE_PERIOD,
        "failureThreshold": startup_failures,
    }
    container["readinessProbe"] = {**check, "periodSeconds": PROBE_PERIOD, "failureThreshold": 3}
    container["livenessProbe"] = {**check, "periodSeconds": 20, "failureThreshold": 3}
    pod: dict[str, Any] = {
        "containers": [container],
        # SIGTERM drains (finish in-flight streams, up to the runtime's drain timeout of 30 s)
        "terminationGracePeriodSeconds": 45,
    }
    annotations: dict[str, str] = {}
    if launch.reads_config_file:
        container["volumeMounts"] = [{"name": "graph-config", "mountPath": CONFIG_DIR}]
        pod["volumes"] = [{"name": "graph-config", "configMap": {"name": "servegrid-graph-config"}}]
        # a changed config rolls the pods that read it
        annotations["servegrid.io/config-sha256"] = config_hash
    if pull_secrets:
        pod["imagePullSecrets"] = pull_secrets
    return k8s.apps.v1.Deployment(
        f"{ns_name}-{name}",
        metadata=meta(name, name),
        spec={
            "replicas": group.workers,
            "selector": {"matchLabels": _selector(name)},
            "template": {
                "metadata": {
                    "labels": {**_labels(name), "servegrid.io/services": "_".join(group.services)},
                    **({"annotations": annotations} if annotations else {}),
                },
                "spec": pod,
            },
        },
        opts=pulumi.ResourceOptions(depends_on=depends_on),
    )


def _volume_claim(storage: Storage) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class:
        spec["storageClassName"] = storage.storage_class
    return {"metadata": {"name": "data"}, "spec": spec}


def _headless(
    ns_name: str,
    name: str,
    ports: list[dict[str, Any]],
    meta: Callable,
    opts: pulumi.ResourceOptions,
) -> None:
    k8s.core.v1.Service(
        f"{ns_name}-{name}",
        metadata=meta(name, name),
        spec={
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # peers must find each other before ready
            "selector": _selector(name),
            "ports": ports,
        },
        opts=opts,
    )


def _etcd(
    ns_name: str,
    storage: Storage,
    meta: Callable,
    pull_secrets: Callable,
    opts: pulumi.ResourceOptions,
) -> None:
    ports = [
        {"name": "client", "port": ETCD_CLIENT_PORT, "protocol": "TCP"},
        {"name": "peer", "port": ETCD_PEER_PORT, "protocol": "TCP"},
    ]
    _headless(ns_name, "etcd", ports, meta, opts)
    peer = f"http://etcd-0.etcd.{ns_name}.svc:{ETCD_PEER_PORT}"
    health = {"httpGet": {"path": "/health", "port": "client"}, "periodSeconds": 10}
    pod: dict[str, Any] = {
        "containers": [
            {
                "name": "etcd",
                "image": storage.image,
                "command": [
                    "etcd",
                    "--name=etcd-0",
                    "--data-dir=/var/lib/etcd/data",
                    f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
                    f"--advertise-client-urls=http://etcd-0.etcd.{ns_name}.svc:{ETCD_CLIENT_PORT}",
                    f"--listen-peer-urls=http://0.0.0.0:{ETCD_PEER_PORT}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=etcd-0={peer}",
                    "--initial-cluster-state=new",
                ],
                "ports": [
                    {"name": p["name"], "containerPort": p["port"], "protocol": "TCP"}
                    for p in ports
                ],
                "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
                "readinessProbe": health,
                "livenessProbe": {**health, "failureThreshold": 6},
            }
        ]
    }
    secrets = pull_secrets(storage.image)
    if secrets:
        pod["imagePullSecrets"] = secrets
    k8s.apps.v1.StatefulSet(
        f"{ns_name}-etcd",
        metadata=meta("etcd", "etcd"),
        spec={
            "serviceName": "etcd",
            "replicas": 1,
            "selector": {"matchLabels": _selector("etcd")},
            "template": {"metadata": {"labels": _labels("etcd")}, "spec": pod},
            "volumeClaimTemplates": [_volume_claim(storage)],
        },
        opts=opts,
    )


def _nats_conf(storage: Storage, password: str) -> str:
    """nats-server's config: JetStream on the volume; one user, servegrid, the secret."""
    max_store = storage.size.replace("i", "")  # "10Gi" → nats's "10G"
    return (
        f"port: {NATS_PORT}\n"
        f"http_port: {NATS_MONITOR_PORT}\n"
        f'jetstream {{ store_dir: "/data/jetstream", max_file_store: {max_store} }}\n'
        f"authorization {{ users: [ {{ user: {NATS_USER}, password: {json.dumps(password)} }} ] }}"
        "\n"
    )


def _nats(
    ns_name: str,
    storage: Storage,
    meta: Callable,
    pull_secrets: Callable,
    conf_secret: k8s.core.v1.Secret,
    opts: pulumi.ResourceOptions,
) -> None:
    ports = [
        {"name": "client", "port": NATS_PORT, "protocol": "TCP"},
        {"name": "monitor", "port": NATS_MONITOR_PORT, "protocol": "TCP"},
    ]
    _headless(ns_name, "nats", ports, meta, opts)
    health = {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"}}
    pod: dict[str, Any] = {
        "containers": [
            {
                "name": "nats",
                "image": storage.image,
                "args": ["-c", "/etc/nats/nats.conf"],
                "ports": [
                    {"name": p["name"], "containerPort": p["port"], "protocol": "TCP"}
                    for p in ports
                ],
                "volumeMounts": [
                    {"name": "data", "mountPath": "/data"},
                    {"name": "config", "mountPath": "/etc/nats", "readOnly": True},
                ],
                "readinessProbe": {**health, "periodSeconds": 10},
                "livenessProbe": {**health, "periodSeconds": 20, "failureThreshold": 6},
            }
        ],
        "volumes": [{"name": "config", "secret": {"secretName": "nats-config"}}],
    }
    secrets = pull_secrets(storage.image)
    if secrets:
        pod["imagePullSecrets"] = secrets
    k8s.apps.v1.StatefulSet(
        f"{ns_name}-nats",
        metadata=meta("nats", "nats"),
        spec={
            "serviceName": "nats",
            "replicas": 1,
            "selector": {"matchLabels": _selector("nats")},
            "template": {"metadata": {"labels": _labels("nats")}, "spec": pod},
            "volumeClaimTemplates": [_volume_claim(storage)],
        },
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=[conf_secret])),
    )
