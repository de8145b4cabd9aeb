"""From stack settings and the graph config to the list of nodes: pure, no Pulumi.

GPU groups are sized from the graph unless the stack config gives a count: a group gets
enough nodes for its service's ``ServiceArgs.workers`` copies of ``resources.gpu`` GPUs each.
A worker that needs more GPUs than one node has spans several nodes joined as one Ray
cluster (its first node is the Ray head and runs the worker; the others only join).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stacks.aws.instance_types import gpu_instance_type
from stacks.aws.settings import AwsSettings, GpuGroup
from stacks.errors import StackConfigError
from stacks.graph import GraphPlan

# Which inventory group runs which service: the deploy roles' placement (servegrid_service).
SERVICE_GROUPS = {
    "Frontend": "frontend",
    "Processor": "frontend",
    "Router": "router",
    "Worker": "decode",
    "PrefillWorker": "prefill",
}
GPU_GROUP_SERVICE = {"decode": "Worker", "prefill": "PrefillWorker"}
HEAD_ONLY_GROUPS = ("etcd", "nats")  # on the first head node
RAY_HEAD, RAY_WORKER = "ray_head", "ray_worker"


@dataclass(frozen=True)
class Node:
    name: str
    role: str  # "head" | "decode" | "prefill"
    instance_type: str
    groups: tuple[str, ...]
    efa_interfaces: int = 0
    ray_cluster: str | None = None
    # copies of each service this node runs, where the node runs a share of a GPU service
    service_workers: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterPlan:
    nodes: tuple[Node, ...]
    frontend_port: int

    def of_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes if n.role == role]


def plan_cluster(settings: AwsSettings, graph: GraphPlan) -> ClusterPlan:
    """The nodes to create, or StackConfigError naming the key to fix."""
    services = graph.loaded.graph.names()
    unplaced = [s for s in services if s not in SERVICE_GROUPS]
    if unplaced:
        known = ", ".join(f"{s} → {g}" for s, g in SERVICE_GROUPS.items())
        raise StackConfigError(
            f"graph config {graph.path}: service(s) {', '.join(unplaced)} have no inventory "
            f"group on AWS nodes (known: {known})"
        )
    cluster = settings.cluster_name
    head = settings.node_groups.head
    head_groups = [
        g for g in ("frontend", "router") if any(SERVICE_GROUPS[s] == g for s in services)
    ]
    nodes = [
        Node(
            f"{cluster}-head-{i}",
            "head",
            head.instance_type,
            tuple([*head_groups, *(HEAD_ONLY_GROUPS if i == 0 else ())]),
        )
        for i in range(head.count)
    ]
    for role, service in GPU_GROUP_SERVICE.items():
        group_settings: GpuGroup = getattr(settings.node_groups, role)
        nodes += _gpu_nodes(cluster, role, service, group_settings, graph)
    port = int(graph.settings("Frontend").get("port", 8000)) if "Frontend" in services else 8000
    return ClusterPlan(tuple(nodes), port)


def _gpu_nodes(
    cluster: str, role: str, service: str, group: GpuGroup, graph: GraphPlan
) -> list[Node]:
    where = f"nodeGroups.{role}"
    kind = gpu_instance_type(group.instance_type, f"{where}.instanceType")
    efa = kind.efa_interfaces if group.efa_interfaces is None else group.efa_interfaces
    if efa > kind.efa_interfaces:
        raise StackConfigError(
            f"{where}.efaInterfaces is {efa}, but {group.instance_type} takes at most "
            f"{kind.efa_interfaces} EFA interface(s)"
        )
    process = graph.group_of(service)
    if process is None:
        if group.count:
            raise StackConfigError(
                f"{where}.count is {group.count}, but graph config {graph.path} has no "
                f"{service}; remove the count or use a graph with {service}"
            )
        return []
    workers, gpus = process.workers, max(process.gpus, 1)

    def node(index: int, groups: tuple[str, ...], copies: int, ray: str | None = None) -> Node:
        name = f"{cluster}-{role}-{index}"
        shares = {s: copies for s in process.services} if copies else {}
        return Node(name, role, group.instance_type, groups, efa, ray, shares)

    if gpus > kind.gpus:  # one worker spans several nodes: a Ray cluster per worker
        per_worker = math.ceil(gpus / kind.gpus)
        needed = workers * per_worker
        if group.count is not None and group.count != needed:
            raise StackConfigError(
                f"{where}.count is {group.count}, but {workers} {service} worker(s) of {gpus} "
                f"GPUs on {group.instance_type} ({kind.gpus} GPUs) take exactly {needed} nodes "
                f"({per_worker} per worker, one Ray cluster each); remove the count or set "
                f"{needed}"
            )
        nodes = []
        for w in range(workers):
            ray = f"{role}-{w}"
            for k in range(per_worker):
                index = w * per_worker + k
                if k == 0:
                    nodes.append(node(index, (role, RAY_HEAD), 1, ray))
                else:
                    nodes.append(node(index, (RAY_WORKER,), 0, ray))
        return nodes
    per_node = kind.gpus // gpus
    needed = math.ceil(workers / per_node)
    count = needed if group.count is None else group.count
    if count < needed:
        raise StackConfigError(
            f"{where}.count is {count}, but {workers} {service} worker(s) of {gpus} GPU(s) "
            f"need {needed} {group.instance_type} node(s) ({kind.gpus} GPUs each); raise the "
            f"count or remove it"
        )
    # Spread the copies evenly; no node gets more than its GPUs hold.
    shares = [workers // count + (1 if i < workers % count else 0) for i in range(count)]
    return [node(i, (role,), shares[i]) for i in range(count)]
