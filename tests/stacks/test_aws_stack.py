"""The AWS stack under Pulumi's mocks, from its example config: what it declares, the
security-group rules, the inventory it writes (read back by ansible-inventory), bad config."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stacks.aws import program
from stacks.aws.inventory import INVENTORY_GROUPS
from stacks.errors import StackConfigError
from tests.stacks.harness import STACKS, RecordingMocks, Run, example_config, run_program

AWS = STACKS / "aws"
PROJECT = "servegrid-aws"
INSTANCE = "aws:ec2/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"


def run_aws(overrides: dict | None = None, mocks: RecordingMocks | None = None) -> Run:
    return run_program(
        PROJECT,
        example_config(AWS, overrides),
        program.build,
        lambda stack: {"inventory": stack.inventory},
        mocks,
    )


def fails_before_any_resource(overrides: dict) -> str:
    """The StackConfigError's message; the program declared nothing and called nothing."""
    mocks = RecordingMocks()
    with pytest.raises(StackConfigError) as failure:
        run_aws(overrides, mocks)
    assert mocks.resources == [] and mocks.calls == []
    return str(failure.value)


def graph_with_workers(tmp_path: Path, workers: int, gpus: int = 8) -> str:
    """The example's graph config with another Worker count (and GPUs per worker)."""
    data = yaml.safe_load((AWS / "graph-p5.yaml").read_text())
    data["Worker"]["ServiceArgs"] = {"workers": workers, "resources": {"gpu": gpus}}
    path = tmp_path / f"graph-{workers}x{gpus}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def ansible_inventory_list(text: str, tmp_path: Path) -> dict:
    path = tmp_path / "hosts.ini"
    path.write_text(text)
    done = subprocess.run(
        [str(ANSIBLE_INVENTORY), "-i", str(path), "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    return json.loads(done.stdout)


def test_example_declares_one_network_placement_group_and_a_node_per_worker() -> None:
    run = run_aws()
    counts: dict[str, int] = {}
    for resource in run.mocks.resources:
        counts[resource.typ] = counts.get(resource.typ, 0) + 1
    assert counts == {
        "aws:ec2/vpc:Vpc": 1,
        "aws:ec2/subnet:Subnet": 1,
        "aws:ec2/internetGateway:InternetGateway": 1,
        "aws:ec2/routeTable:RouteTable": 1,
        "aws:ec2/routeTableAssociation:RouteTableAssociation": 1,
        "aws:ec2/placementGroup:PlacementGroup": 1,
        "aws:ec2/keyPair:KeyPair": 1,
        SECURITY_GROUP: 3,
        LAUNCH_TEMPLATE: 1,  # decode only: the graph has no PrefillWorker
        INSTANCE: 3,  # one head + one p5 per 8-GPU worker (graph-p5.yaml: 2 workers)
    }
    assert run.mocks.named("servegrid-placement").inputs["strategy"] == "cluster"


def test_nodes_are_tagged_with_their_inventory_groups_and_gpu_nodes_share_the_placement_group() -> (
    None
):
    run = run_aws()
    instances = {r.name: r.inputs for r in run.mocks.of_type(INSTANCE)}
    head = instances["servegrid-head-0"]
    assert head["tags"]["servegrid:groups"] == "frontend router etcd nats"
    assert head["instanceType"] == "m7i.2xlarge"
    assert head["associatePublicIpAddress"] is True
    for name in ("servegrid-decode-0", "servegrid-decode-1"):
        tags = instances[name]["tags"]
        assert tags["servegrid:groups"] == "decode"
        assert tags["servegrid:role"] == "decode"
        assert tags["servegrid:cluster"] == "servegrid"
        assert instances[name]["placementGroup"] == "servegrid-placement"
        assert instances[name]["launchTemplate"]["id"] == "servegrid-decode-id"


def test_p5_nodes_get_an_efa_interface_on_each_of_their_32_network_cards() -> None:
    run = run_aws()
    (template,) = run.mocks.of_type(LAUNCH_TEMPLATE)
    assert template.inputs["instanceType"] == "p5.48xlarge"
    interfaces = template.inputs["networkInterfaces"]
    assert [i["networkCardIndex"] for i in interfaces] == list(range(32))
    assert {i["interfaceType"] for i in interfaces} == {"efa"}
    assert [i["deviceIndex"] for i in interfaces[:2]] == [0, 1]
    assert all(
        i["securityGroups"] == ["servegrid-cluster-id", "servegrid-ssh-id"] for i in interfaces
    )


def rules(run: Run, group: str) -> list[dict]:
    return run.mocks.named(group).inputs.get("ingress", [])


def test_ssh_is_open_to_the_admin_cidrs_only_and_the_frontend_port_to_the_allowed_ones() -> None:
    run = run_aws()
    (ssh,) = rules(run, "servegrid-ssh")
    assert (ssh["protocol"], ssh["fromPort"], ssh["toPort"]) == ("tcp", 22, 22)
    assert ssh["cidrBlocks"] == ["203.0.113.7/32"]
    (frontend,) = rules(run, "servegrid-frontend")
    assert (frontend["fromPort"], frontend["toPort"]) == (8000, 8000)  # graph: Frontend.port
    assert frontend["cidrBlocks"] == ["203.0.113.0/24"]
    (within,) = rules(run, "servegrid-cluster")
    assert within == {"protocol": "-1", "fromPort": 0, "toPort": 0, "self": True}
    for group in run.mocks.of_type(SECURITY_GROUP):
        for rule in group.inputs.get("ingress", []):
            if rule["fromPort"] <= 22 <= rule["toPort"] or rule["protocol"] == "-1":
                assert "0.0.0.0/0" not in rule.get("cidrBlocks", []), group.name


def test_ssh_from_anywhere_only_when_the_config_says_so() -> None:
    run = run_aws({"servegrid-aws:adminCidrs": ["0.0.0.0/0"]})
    (ssh,) = rules(run, "servegrid-ssh")
    assert ssh["cidrBlocks"] == ["0.0.0.0/0"]
    # frontendCidrs is still its own setting
    assert rules(run, "servegrid-frontend")[0]["cidrBlocks"] == ["203.0.113.0/24"]


def test_the_inventory_output_is_an_ansible_inventory_of_the_created_nodes(tmp_path: Path) -> None:
    run = run_aws()
    listed = ansible_inventory_list(run.outputs["inventory"], tmp_path)
    assert listed["all"]["children"] == ["ungrouped", "servegrid"]
    hosts_of = {g: sorted(listed.get(g, {}).get("hosts", [])) for g in INVENTORY_GROUPS}
    assert hosts_of["frontend"] == hosts_of["router"] == ["servegrid-head-0"]
    assert hosts_of["etcd"] == hosts_of["nats"] == ["servegrid-head-0"]
    assert hosts_of["decode"] == ["servegrid-decode-0", "servegrid-decode-1"]
    assert hosts_of["prefill"] == hosts_of["ray_head"] == hosts_of["ray_worker"] == []
    hostvars = listed["_meta"]["hostvars"]
    head = hostvars["servegrid-head-0"]
    assert head["ansible_host"].startswith("198.51.100.")  # the public address
    assert head["ansible_user"] == "ubuntu"
    decode = hostvars["servegrid-decode-0"]
    assert decode["ansible_host"] == decode["servegrid_service_address"]
    assert decode["ansible_host"].startswith("10.42.")
    # the roles advertise private addresses, also on the head node
    assert head["etcd_address"] == head["nats_address"] == head["servegrid_service_address"]
    assert head["etcd_address"].startswith("10.42.")
    assert sorted(listed["servegrid"]["children"]) == sorted(INVENTORY_GROUPS)
    assert f"ProxyJump=ubuntu@{head['ansible_host']}" in decode["ansible_ssh_common_args"]
    assert decode["servegrid_service_workers"] == {"Worker": 1}
    assert decode["servegrid_efa_interfaces"] == 32


def test_a_worker_wider_than_a_node_spans_a_ray_cluster_of_nodes(tmp_path: Path) -> None:
    run = run_aws({"servegrid-aws:graphConfig": graph_with_workers(tmp_path, 2, gpus=16)})
    instances = {r.name: r.inputs["tags"] for r in run.mocks.of_type(INSTANCE)}
    decode = {n: t for n, t in instances.items() if t["servegrid:role"] == "decode"}
    assert {n: (t["servegrid:groups"], t["servegrid:ray-cluster"]) for n, t in decode.items()} == {
        "servegrid-decode-0": ("decode ray_head", "decode-0"),
        "servegrid-decode-1": ("ray_worker", "decode-0"),
        "servegrid-decode-2": ("decode ray_head", "decode-1"),
        "servegrid-decode-3": ("ray_worker", "decode-1"),
    }
    listed = ansible_inventory_list(run.outputs["inventory"], tmp_path)
    assert sorted(listed["ray_head"]["hosts"]) == ["servegrid-decode-0", "servegrid-decode-2"]
    assert listed["_meta"]["hostvars"]["servegrid-decode-3"]["ray_cluster_name"] == "decode-1"


def test_one_more_decode_worker_adds_exactly_one_gpu_instance(tmp_path: Path) -> None:
    before = run_aws({"servegrid-aws:graphConfig": graph_with_workers(tmp_path, 2)})
    after = run_aws({"servegrid-aws:graphConfig": graph_with_workers(tmp_path, 3)})
    old = {(r.typ, r.name): r.inputs for r in before.mocks.resources}
    new = {(r.typ, r.name): r.inputs for r in after.mocks.resources}
    assert set(new) - set(old) == {(INSTANCE, "servegrid-decode-2")}
    assert set(old) - set(new) == set()
    changed = [key for key in old if old[key] != new[key]]
    assert changed == []
    assert new[(INSTANCE, "servegrid-decode-2")]["tags"]["servegrid:groups"] == "decode"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"servegrid-aws:nodeGroups": {"decode": {"instanceType": "p9.48xlarge"}}},
            "nodeGroups.decode.instanceType: instance type 'p9.48xlarge' is not a known GPU",
        ),
        (
            {"servegrid-aws:nodeGroups": {"prefill": {"instanceType": "m7i.48xlarge"}}},
            "'m7i' is not a GPU family this stack knows",
        ),
        (
            {"servegrid-aws:nodeGroups": {"head": {"count": 0}}},
            "servegrid-aws:nodeGroups.head.count: Value error, head.count is 0; the cluster "
            "needs at least one head node",
        ),
        (
            {"servegrid-aws:adminCidrs": ["203.0.113.7/33"]},
            "is not a CIDR like",
        ),
        (
            {"servegrid-aws:nodeGroups": {"decode": {"count": 1}}},
            "nodeGroups.decode.count is 1, but 2 Worker worker(s) of 8 GPU(s) need 2",
        ),
    ],
)
def test_bad_stack_config_fails_with_a_clear_message_before_any_resource(
    overrides: dict, message: str
) -> None:
    assert message in fails_before_any_resource(overrides)


def test_a_graph_config_that_does_not_parse_fails_before_any_resource(tmp_path: Path) -> None:
    broken = tmp_path / "graph.yaml"
    broken.write_text("graph: servegrid.graphs.agg:Frontend\nWorker: {engine: mocker\n")
    text = fails_before_any_resource({"servegrid-aws:graphConfig": str(broken)})
    assert f"graph config {broken}" in text and "malformed YAML" in text


def test_the_program_entry_point_runs_and_exports_the_inventory(tmp_path: Path) -> None:
    def main() -> None:
        runpy.run_path(str(AWS / "__main__.py"), run_name="__main__")

    run = run_program(PROJECT, example_config(AWS), main)
    assert len(run.mocks.of_type(INSTANCE)) == 3
