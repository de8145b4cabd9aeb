"""The AWS stack's config keys (namespace ``servegrid-aws``), typed and checked."""

from __future__ import annotations

import ipaddress

import pydantic

from stacks.config import StackSettings

PROJECT = "servegrid-aws"
OPEN_TO_WORLD = "0.0.0.0/0"


class HeadGroup(StackSettings):
    """The CPU head node(s): etcd, NATS, the frontend and the router; the SSH entry point."""

    instance_type: str = "m7i.2xlarge"
    count: int = pydantic.Field(1, description="head nodes; at least one")
    ami: str | None = None
    root_volume_gb: int = pydantic.Field(100, ge=8)

    @pydantic.field_validator("count")
    @classmethod
    def _at_least_one(cls, count: int) -> int:
        if count < 1:
            raise ValueError(
                f"head.count is {count}; the cluster needs at least one head node "
                "(it runs etcd, NATS and the frontend)"
            )
        return count


class GpuGroup(StackSettings):
    """A GPU node group (decode or prefill)."""

    instance_type: str = "p5.48xlarge"
    # Unset: as many nodes as the graph's workers of this group need (see plan.py).
    count: int | None = pydantic.Field(None, ge=0)
    ami: str | None = None
    root_volume_gb: int = pydantic.Field(500, ge=8)
    # Unset: every network card of the type gets an EFA interface.
    efa_interfaces: int | None = pydantic.Field(None, ge=0)


class NodeGroups(StackSettings):
    head: HeadGroup = HeadGroup()
    decode: GpuGroup = GpuGroup()
    prefill: GpuGroup = GpuGroup()


class AwsSettings(StackSettings):
    graph_config: str
    cluster_name: str = pydantic.Field("servegrid", pattern=r"^[a-z][a-z0-9-]{0,30}$")
    admin_cidrs: list[str] = pydantic.Field(min_length=1)
    # Unset: the admin CIDRs.
    frontend_cidrs: list[str] | None = None
    vpc_cidr: str = "10.42.0.0/16"
    subnet_cidr: str = "10.42.0.0/20"
    availability_zone: str | None = None
    ssh_public_key: str | None = None
    key_name: str | None = None
    ssh_user: str = "ubuntu"
    node_groups: NodeGroups = NodeGroups()

    @pydantic.field_validator("admin_cidrs", "frontend_cidrs")
    @classmethod
    def _cidrs(cls, cidrs: list[str] | None) -> list[str] | None:
        for cidr in cidrs or []:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR like 203.0.113.7/32 ({exc})") from None
        return cidrs

    @pydantic.field_validator("vpc_cidr", "subnet_cidr")
    @classmethod
    def _one_cidr(cls, cidr: str) -> str:
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not a CIDR ({exc})") from None
        return cidr

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> AwsSettings:
        vpc = ipaddress.ip_network(self.vpc_cidr)
        if not ipaddress.ip_network(self.subnet_cidr).subnet_of(vpc):  # type: ignore[arg-type]
            raise ValueError(f"subnetCidr {self.subnet_cidr} is not inside vpcCidr {self.vpc_cidr}")
        if bool(self.ssh_public_key) == bool(self.key_name):
            raise ValueError(
                "set exactly one of sshPublicKey (the stack creates a key pair) or keyName "
                "(an existing EC2 key pair)"
            )
        return self

    @property
    def frontend_sources(self) -> list[str]:
        return self.frontend_cidrs if self.frontend_cidrs is not None else self.admin_cidrs
