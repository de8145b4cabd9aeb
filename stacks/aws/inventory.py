"""The Ansible inventory of the created nodes: a pure function, so it is tested as it is.

Format: the YAML inventories of ``inventories/`` (``all.hosts`` with host variables,
``all.children`` with one group per role the deploy roles know). Head nodes have public
addresses; GPU nodes, whose several EFA interfaces rule out an automatic public address, are
reached through the first head node (SSH ProxyJump).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from stacks.aws.plan import Node

# Every group the deploy roles know, present even when empty so plays that target one work.
INVENTORY_GROUPS = (
    "frontend",
    "router",
    "decode",
    "prefill",
    "etcd",
    "nats",
    "ray_head",
    "ray_worker",
)

HEADER = (
    "# Written by stacks/aws (`pulumi stack output inventory`); rerun `pulumi up` rather than\n"
    "# editing it: the next run writes it again.\n"
)


@dataclass(frozen=True)
class CreatedNode:
    node: Node
    private_ip: str
    public_ip: str | None


def inventory_data(nodes: list[CreatedNode], ssh_user: str, cluster_name: str) -> dict[str, Any]:
    bastion = next((n for n in nodes if n.node.role == "head" and n.public_ip), None)
    hosts: dict[str, dict[str, Any]] = {}
    for created in nodes:
        node = created.node
        host: dict[str, Any] = {
            "ansible_host": created.public_ip or created.private_ip,
            "servegrid_private_ip": created.private_ip,
            "servegrid_instance_type": node.instance_type,
        }
        if not created.public_ip and bastion is not None:
            host["ansible_ssh_common_args"] = (
                f"-o ProxyJump={ssh_user}@{bastion.public_ip} -o StrictHostKeyChecking=accept-new"
            )
        if node.ray_cluster:
            host["ray_cluster_name"] = node.ray_cluster
        if node.service_workers:
            host["servegrid_service_workers"] = dict(node.service_workers)
        if node.efa_interfaces:
            host["servegrid_efa_interfaces"] = node.efa_interfaces
        hosts[node.name] = host
    children = {
        group: {"hosts": {c.node.name: None for c in nodes if group in c.node.groups}}
        for group in INVENTORY_GROUPS
    }
    return {
        "all": {
            "vars": {"ansible_user": ssh_user, "servegrid_cluster_name": cluster_name},
            "hosts": hosts,
            "children": children,
        }
    }


def render_inventory(nodes: list[CreatedNode], ssh_user: str, cluster_name: str) -> str:
    """The inventory file's text."""
    data = inventory_data(nodes, ssh_user, cluster_name)
    return HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
