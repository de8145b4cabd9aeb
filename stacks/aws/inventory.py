"""The Ansible inventory of the created nodes: a pure function, so it is tested as it is.

Format: the INI inventories of ``inventories/`` (one line per host with its variables, one
section per group the deploy roles know, and the ``servegrid`` parent group). The cluster
addresses the roles advertise (``etcd_address``, ``nats_address``,
``servegrid_service_address``) are the nodes' private addresses. Head nodes have public
addresses for SSH; GPU nodes, whose several EFA interfaces rule out an automatic public
address, are reached through the first head node (SSH ProxyJump).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stacks.aws.plan import Node

# Every group the deploy roles know, present even when empty so plays that target one work.
INVENTORY_GROUPS = (
    "etcd",
    "nats",
    "frontend",
    "router",
    "decode",
    "prefill",
    "ray_head",
    "ray_worker",
)
PARENT_GROUP = "servegrid"
# Host variables the deploy roles read for the address a node serves on.
ADDRESS_VARS = ("etcd_address", "nats_address", "servegrid_service_address")

HEADER = (
    "# Written by stacks/aws (`pulumi stack output inventory`); rerun `pulumi up` rather than\n"
    "# editing it: the next run writes it again.\n"
)


@dataclass(frozen=True)
class CreatedNode:
    node: Node
    private_ip: str
    public_ip: str | None


def host_vars(created: CreatedNode, bastion: CreatedNode | None, ssh_user: str) -> dict[str, Any]:
    node = created.node
    values: dict[str, Any] = {"ansible_host": created.public_ip or created.private_ip}
    values.update({name: created.private_ip for name in ADDRESS_VARS})
    values["servegrid_instance_type"] = node.instance_type
    if not created.public_ip and bastion is not None:
        values["ansible_ssh_common_args"] = (
            f"-o ProxyJump={ssh_user}@{bastion.public_ip} -o StrictHostKeyChecking=accept-new"
        )
    if node.ray_cluster:
        values["ray_cluster_name"] = node.ray_cluster
    if node.service_workers:
        values["servegrid_service_workers"] = dict(node.service_workers)
    if node.efa_interfaces:
        values["servegrid_efa_interfaces"] = node.efa_interfaces
    return values


def _ini_value(value: Any) -> str:
    # Host-line values are read as Python literals: quote text, JSON for mappings.
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, dict):
        return "'" + json.dumps(value, separators=(",", ":")) + "'"
    return "'" + str(value).replace("'", "") + "'"


def render_inventory(nodes: list[CreatedNode], ssh_user: str, cluster_name: str) -> str:
    """The inventory file's text (INI)."""
    bastion = next((n for n in nodes if n.node.role == "head" and n.public_ip), None)
    lines = [HEADER.rstrip("\n"), "[all]"]
    for created in nodes:
        pairs = host_vars(created, bastion, ssh_user)
        lines.append(created.node.name + "".join(f" {k}={_ini_value(v)}" for k, v in pairs.items()))
    for group in INVENTORY_GROUPS:
        lines += ["", f"[{group}]"]
        lines += [c.node.name for c in nodes if group in c.node.groups]
    lines += ["", f"[{PARENT_GROUP}:children]", *INVENTORY_GROUPS]
    lines += [
        "",
        "[all:vars]",
        f"ansible_user={ssh_user}",
        f"servegrid_cluster_name={cluster_name}",
    ]
    return "\n".join(lines) + "\n"
