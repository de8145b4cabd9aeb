"""The AWS stack's resources: network, placement group, security groups, nodes, inventory.

Everything is checked (settings, graph config, node plan) before the first resource is
declared, so bad input never leaves a half-declared stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_aws as aws

from stacks.aws.inventory import CreatedNode, render_inventory
from stacks.aws.plan import ClusterPlan, Node, plan_cluster
from stacks.aws.settings import OPEN_TO_WORLD, PROJECT, AwsSettings, GpuGroup
from stacks.config import config_values, read_settings, resolve_path
from stacks.graph import load_graph_plan

PROGRAM_DIR = Path(__file__).resolve().parent
SSH_PORT = 22
# Default images: Ubuntu 22.04 for the head; AWS's Deep Learning base image (NVIDIA driver,
# EFA installer) for GPU nodes. Both can be pinned per group with `ami`.
HEAD_AMI_FILTER = ("099720109477", "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*")
GPU_AMI_FILTER = ("amazon", "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *")


@dataclass
class AwsStack:
    plan: ClusterPlan
    settings: AwsSettings
    instances: dict[str, aws.ec2.Instance]
    security_groups: dict[str, aws.ec2.SecurityGroup]
    inventory: pulumi.Output[str]


def load_settings(values: dict[str, str | None] | None = None) -> AwsSettings:
    return read_settings(
        AwsSettings, PROJECT, values if values is not None else config_values(AwsSettings, PROJECT)
    )


def build(settings: AwsSettings | None = None) -> AwsStack:
    settings = settings or load_settings()
    graph = load_graph_plan(resolve_path(settings.graph_config, PROGRAM_DIR), PROGRAM_DIR)
    plan = plan_cluster(settings, graph)
    # -- nothing is declared above this line; everything below may assume valid input --
    name = settings.cluster_name
    tags = {"servegrid:cluster": name}

    vpc = aws.ec2.Vpc(
        f"{name}-vpc",
        cidr_block=settings.vpc_cidr,
        enable_dns_hostnames=True,
        enable_dns_support=True,
        tags={**tags, "Name": f"{name}-vpc"},
    )
    gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags)
    subnet = aws.ec2.Subnet(
        f"{name}-subnet",
        vpc_id=vpc.id,
        cidr_block=settings.subnet_cidr,
        availability_zone=settings.availability_zone,
        tags={**tags, "Name": f"{name}-subnet"},
    )
    routes = aws.ec2.RouteTable(
        f"{name}-routes",
        vpc_id=vpc.id,
        routes=[aws.ec2.RouteTableRouteArgs(cidr_block=OPEN_TO_WORLD, gateway_id=gateway.id)],
        tags=tags,
    )
    aws.ec2.RouteTableAssociation(f"{name}-routes", subnet_id=subnet.id, route_table_id=routes.id)
    placement = aws.ec2.PlacementGroup(f"{name}-placement", strategy="cluster", tags=tags)

    groups = _security_groups(name, vpc, settings, plan.frontend_port, tags)
    key_name: pulumi.Input[str]
    if settings.ssh_public_key:
        key_name = aws.ec2.KeyPair(
            f"{name}-key", public_key=settings.ssh_public_key, tags=tags
        ).key_name
    else:
        assert settings.key_name is not None
        key_name = settings.key_name

    instances: dict[str, aws.ec2.Instance] = {}
    head = settings.node_groups.head
    head_ami = head.ami or _lookup_ami(*HEAD_AMI_FILTER)
    for node in plan.of_role("head"):
        instances[node.name] = aws.ec2.Instance(
            node.name,
            ami=head_ami,
            instance_type=node.instance_type,
            subnet_id=subnet.id,
            vpc_security_group_ids=[groups["cluster"].id, groups["ssh"].id, groups["frontend"].id],
            associate_public_ip_address=True,
            key_name=key_name,
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_size=head.root_volume_gb, volume_type="gp3"
            ),
            tags=_node_tags(node, tags),
            opts=pulumi.ResourceOptions(depends_on=[gateway]),
        )
    for role in ("decode", "prefill"):
        nodes = plan.of_role(role)
        if not nodes:
            continue
        group: GpuGroup = getattr(settings.node_groups, role)
        template = _gpu_launch_template(
            name, role, group, nodes[0], subnet, [groups["cluster"], groups["ssh"]], key_name, tags
        )
        for node in nodes:
            instances[node.name] = aws.ec2.Instance(
                node.name,
                launch_template=aws.ec2.InstanceLaunchTemplateArgs(
                    id=template.id, version=template.latest_version.apply(str)
                ),
                placement_group=placement.name,
                tags=_node_tags(node, tags),
                opts=pulumi.ResourceOptions(depends_on=[gateway]),
            )

    inventory = _inventory_output(plan, instances, settings)
    return AwsStack(plan, settings, instances, groups, inventory)


def export(stack: AwsStack) -> None:
    heads = [stack.instances[n.name] for n in stack.plan.of_role("head")]
    pulumi.export("inventory", stack.inventory)
    pulumi.export("headPublicIp", heads[0].public_ip)
    pulumi.export(
        "frontendUrl",
        heads[0].public_ip.apply(lambda ip: f"http://{ip}:{stack.plan.frontend_port}"),
    )
    pulumi.export("nodes", {name: i.private_ip for name, i in stack.instances.items()})


def _security_groups(
    name: str, vpc: aws.ec2.Vpc, settings: AwsSettings, frontend_port: int, tags: dict[str, str]
) -> dict[str, aws.ec2.SecurityGroup]:
    # Everything within the cluster (etcd, NATS, the request plane, Ray, NCCL and EFA's
    # SRD traffic, which needs the group to allow all traffic to and from itself).
    cluster = aws.ec2.SecurityGroup(
        f"{name}-cluster",
        vpc_id=vpc.id,
        description="servegrid: all traffic between the cluster's nodes (EFA needs this)",
        ingress=[
            aws.ec2.SecurityGroupIngressArgs(protocol="-1", from_port=0, to_port=0, self=True)
        ],
        egress=[
            aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, self=True),
            aws.ec2.SecurityGroupEgressArgs(
                protocol="-1", from_port=0, to_port=0, cidr_blocks=[OPEN_TO_WORLD]
            ),
        ],
        tags={**tags, "Name": f"{name}-cluster"},
    )
    ssh = aws.ec2.SecurityGroup(
        f"{name}-ssh",
        vpc_id=vpc.id,
        description="servegrid: SSH from the admin CIDRs",
        ingress=[
            aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp",
                from_port=SSH_PORT,
                to_port=SSH_PORT,
                cidr_blocks=list(settings.admin_cidrs),
            )
        ],
        tags={**tags, "Name": f"{name}-ssh"},
    )
    frontend = aws.ec2.SecurityGroup(
        f"{name}-frontend",
        vpc_id=vpc.id,
        description="servegrid: the OpenAI frontend from the allowed CIDRs",
        ingress=[
            aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp",
                from_port=frontend_port,
                to_port=frontend_port,
                cidr_blocks=list(settings.frontend_sources),
            )
        ],
        tags={**tags, "Name": f"{name}-frontend"},
    )
    return {"cluster": cluster, "ssh": ssh, "frontend": frontend}


def _gpu_launch_template(
    name: str,
    role: str,
    group: GpuGroup,
    node: Node,
    subnet: aws.ec2.Subnet,
    security_groups: list[aws.ec2.SecurityGroup],
    key_name: pulumi.Input[str],
    tags: dict[str, str],
) -> aws.ec2.LaunchTemplate:
    # One EFA interface per network card; the first is the node's primary interface. With
    # more than one interface AWS assigns no public address: the nodes are reached through
    # the head node (the inventory sets the SSH jump).
    count = max(node.efa_interfaces, 1)
    interfaces = [
        aws.ec2.LaunchTemplateNetworkInterfaceArgs(
            device_index=0 if card == 0 else 1,
            network_card_index=card,
            interface_type="efa" if node.efa_interfaces else None,
            subnet_id=subnet.id,
            security_groups=[g.id for g in security_groups],
            delete_on_termination="true",
        )
        for card in range(count)
    ]
    return aws.ec2.LaunchTemplate(
        f"{name}-{role}",
        image_id=group.ami or _lookup_ami(*GPU_AMI_FILTER),
        instance_type=group.instance_type,
        key_name=key_name,
        network_interfaces=interfaces,
        block_device_mappings=[
            aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                device_name="/dev/sda1",
                ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_size=group.root_volume_gb, volume_type="gp3"
                ),
            )
        ],
        tags={**tags, "servegrid:role": role},
    )


def _lookup_ami(owner: str, name_pattern: str) -> pulumi.Output[str]:
    found = aws.ec2.get_ami_output(
        most_recent=True,
        owners=[owner],
        filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[name_pattern])],
    )
    return found.id


def _node_tags(node: Node, tags: dict[str, str]) -> dict[str, str]:
    node_tags = {
        **tags,
        "Name": node.name,
        "servegrid:role": node.role,
        # Space-separated: the inventory groups this node belongs to.
        "servegrid:groups": " ".join(node.groups),
    }
    if node.ray_cluster:
        node_tags["servegrid:ray-cluster"] = node.ray_cluster
    return node_tags


def _inventory_output(
    plan: ClusterPlan, instances: dict[str, aws.ec2.Instance], settings: AwsSettings
) -> pulumi.Output[str]:
    nodes = list(plan.nodes)
    addresses = [
        pulumi.Output.all(instances[n.name].private_ip, instances[n.name].public_ip) for n in nodes
    ]

    def render(pairs: list[list[str | None]]) -> str:
        created = [
            CreatedNode(node, private, public or None)
            for node, (private, public) in zip(nodes, pairs, strict=True)
        ]
        return render_inventory(created, settings.ssh_user, settings.cluster_name)

    return pulumi.Output.all(*addresses).apply(render)
