"""The Kubernetes stack under Pulumi's mocks, from its example config: every manifest against
the Kubernetes schemas, replicas and GPUs from the graph config, launch commands that the
runtime accepts, image pull secrets, secrets kept out of plain config, bad config."""

from __future__ import annotations

import base64
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from servegrid.components.launch import build_config, parse_settings
from servegrid.distributed import env
from servegrid.sdk.config import ServiceConfig
from stacks.errors import StackConfigError
from stacks.kubernetes import program
from stacks.kubernetes.commands import CONFIG_PATH
from stacks.kubernetes.pull_secrets import (
    DOCKERCONFIGJSON,
    RegistrySecret,
    image_registry,
    pull_secrets_for,
    secret_hosts,
)
from tests.stacks.harness import REPO, STACKS, RecordingMocks, Run, example_config, run_program

K8S = STACKS / "kubernetes"
PROJECT = "servegrid-k8s"
KUBERNETES_VERSION = "1.30.0"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SECRET = "kubernetes:core/v1:Secret"
PULUMI_SECRET_SIG = "4dabf18193072939515e22adb298388d"
CLUSTER_SECRET = "test-cluster-secret-8f2c"
NAMESPACE_SECRETS = [
    RegistrySecret("regcred", frozenset({"registry.example.com"})),
    RegistrySecret("hub", frozenset({"docker.io"})),
    RegistrySecret("other-registry", frozenset({"ghcr.io"})),
]


def run_k8s(
    overrides: dict | None = None,
    mocks: RecordingMocks | None = None,
    secrets: list[RegistrySecret] | None = None,
) -> Run:
    config = {f"{PROJECT}:clusterSecret": CLUSTER_SECRET, **(overrides or {})}
    found = NAMESPACE_SECRETS if secrets is None else secrets
    return run_program(
        PROJECT,
        example_config(K8S, config),
        lambda: program.build(list_secrets=lambda namespace: (found, None)),
        mocks=mocks,
    )


def plain(value: Any) -> Any:
    """Inputs as a manifest: secrets unwrapped, whole floats (the mocks' numbers) as ints."""
    if isinstance(value, dict):
        if PULUMI_SECRET_SIG in value:
            return plain(value["value"])
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def manifests(run: Run) -> dict[str, dict]:
    """Every Kubernetes manifest the program declared, by ``Kind/name``."""
    found = {}
    for resource in run.mocks.resources:
        if resource.typ.startswith("kubernetes:"):
            manifest = plain(resource.inputs)
            found[f"{manifest['kind']}/{manifest['metadata']['name']}"] = manifest
    return found


def container(run: Run, name: str) -> dict:
    return manifests(run)[name]["spec"]["template"]["spec"]["containers"][0]


def graph_with_workers(tmp_path: Path, workers: int) -> str:
    data = yaml.safe_load((REPO / "configs" / "agg_router.yaml").read_text())
    data["Worker"]["ServiceArgs"]["workers"] = workers
    path = tmp_path / f"agg_router-{workers}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_example_declares_namespace_etcd_nats_config_and_a_deployment_per_process_group() -> None:
    run = run_k8s()
    assert sorted(manifests(run)) == [
        "ConfigMap/servegrid-graph-config",
        "Deployment/frontend",  # Frontend + Processor: one process (ServiceArgs.process)
        "Deployment/router",
        "Deployment/worker",
        "Namespace/servegrid",
        "Secret/nats-config",
        "Secret/servegrid-cluster-secret",
        "Service/etcd",
        "Service/frontend",
        "Service/nats",
        "StatefulSet/etcd",
        "StatefulSet/nats",
    ]


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    run = run_k8s()
    for name, manifest in manifests(run).items():
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {error.message} at {list(error.path)}")
    # the check has teeth: a manifest with a wrong field type is refused
    broken = manifests(run)["Deployment/worker"]
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_replicas_come_from_service_args_workers_and_gpus_from_resources_gpu() -> None:
    found = manifests(run_k8s())
    replicas = {
        m["metadata"]["name"]: m["spec"]["replicas"]
        for m in found.values()
        if m["kind"] == "Deployment"
    }
    assert replicas == {"worker": 2, "router": 1, "frontend": 1}
    worker = found["Deployment/worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # RDMA where the stack config asks for it, with the memory locking it needs
    assert worker["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert worker["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    router = found["Deployment/router"]["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in router


def test_etcd_and_nats_are_statefulsets_with_volumes_and_nats_runs_jetstream() -> None:
    found = manifests(run_k8s())
    for name, size in (("etcd", "2Gi"), ("nats", "10Gi")):
        spec = found[f"StatefulSet/{name}"]["spec"]
        (claim,) = spec["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == size
        mounts = spec["template"]["spec"]["containers"][0]["volumeMounts"]
        assert any(m["name"] == "data" for m in mounts)
    conf = found["Secret/nats-config"]["stringData"]["nats.conf"]
    assert 'jetstream { store_dir: "/data/jetstream"' in conf
    assert f'user: servegrid, password: "{CLUSTER_SECRET}"' in conf


def test_the_cluster_secret_and_nats_credentials_are_secrets_never_plain_config() -> None:
    run = run_k8s()
    for resource in run.mocks.of_type(SECRET):
        assert PULUMI_SECRET_SIG in resource.inputs["stringData"]  # kept secret in the state
    for name, manifest in manifests(run).items():
        if manifest["kind"] != "Secret":
            assert CLUSTER_SECRET not in json.dumps(manifest), name
    worker_env = {e["name"]: e for e in container(run, "Deployment/worker")["env"]}
    assert worker_env[env.SERVEGRID_CLUSTER_SECRET]["valueFrom"]["secretKeyRef"] == {
        "name": "servegrid-cluster-secret",
        "key": "secret",
    }
    assert worker_env[env.NATS_SERVER]["value"] == "nats://nats.servegrid.svc:4222"
    assert worker_env[env.ETCD_ENDPOINTS]["value"] == "http://etcd.servegrid.svc:2379"
    assert worker_env[env.SERVEGRID_ADVERTISE_HOST]["valueFrom"]["fieldRef"] == {
        "fieldPath": "status.podIP"
    }


def test_worker_pods_start_the_launch_module_with_the_configs_settings_as_flags() -> None:
    command = container(run_k8s(), "Deployment/worker")["command"]
    assert command[:3] == ["python", "-m", "servegrid.worker"]
    config = build_config([_worker_class()], parse_settings(command[3:]))
    expected = ServiceConfig(_merged("agg_router.yaml")).settings("Worker")
    assert ServiceConfig(config).settings("Worker") == expected


def test_a_frontend_without_a_router_starts_the_launch_module_with_http_port_and_router_mode() -> (
    None
):
    run = run_k8s({f"{PROJECT}:graphConfig": "../../configs/agg.yaml"})
    command = container(run, "Deployment/frontend")["command"]
    assert command[:3] == ["python", "-m", "servegrid.frontend"]
    assert command[command.index("--http-port") + 1] == "8000"
    assert command[command.index("--router-mode") + 1] == "round-robin"
    assert container(run, "Deployment/frontend")["readinessProbe"]["httpGet"] == {
        "path": "/health",
        "port": "http",
    }


def test_groups_the_launch_modules_cannot_wire_run_serve_from_the_configmap(tmp_path: Path) -> None:
    found = manifests(run_k8s())
    config_text = found["ConfigMap/servegrid-graph-config"]["data"]["graph.yaml"]
    config_file = tmp_path / "graph.yaml"
    config_file.write_text(config_text)
    assert "workers" not in config_text  # the Deployments hold the counts
    for name in ("Deployment/router", "Deployment/frontend"):
        pod = found[name]["spec"]["template"]["spec"]
        command = pod["containers"][0]["command"]
        assert command[:4] == ["python", "-m", "servegrid.cli", "serve"]
        assert pod["volumes"] == [
            {"name": "graph-config", "configMap": {"name": "servegrid-graph-config"}}
        ]
        # the same command line, pointed at the ConfigMap's content, is one the CLI accepts
        args = [str(config_file) if a == CONFIG_PATH else a for a in command[4:]]
        done = subprocess.run(
            [sys.executable, "-m", "servegrid.cli", "serve", *args, "--dry-run"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO / "runtime")},
        )
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout.split("Environment Variable")[0].split(":", 1)[1])
        for service in command[command.index("--service-name") + 1].split(","):
            assert printed[service]["ServiceArgs"]["workers"] == 1


def test_services_have_readiness_liveness_and_startup_probes() -> None:
    found = manifests(run_k8s())
    for name in ("Deployment/worker", "Deployment/router", "Deployment/frontend"):
        spec = found[name]["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert probe in spec, (name, probe)
    router = container(run_k8s(), "Deployment/router")
    assert router["livenessProbe"]["exec"]["command"] == [
        "python",
        "-m",
        "servegrid.cli.probe",
        "Router",
        "--namespace",
        "servegrid",
    ]
    frontend_service = found["Service/frontend"]
    assert frontend_service["spec"]["type"] == "LoadBalancer"
    assert frontend_service["spec"]["ports"][0]["port"] == 8000
    assert frontend_service["spec"]["selector"]["app.kubernetes.io/component"] == "frontend"


def test_pull_secrets_are_discovered_by_registry_host_unless_a_component_opts_out() -> None:
    found = manifests(run_k8s())

    def pull(name: str) -> list[str]:
        return [
            s["name"] for s in found[name]["spec"]["template"]["spec"].get("imagePullSecrets", [])
        ]

    assert pull("Deployment/worker") == ["regcred"]  # registry.example.com/ml/servegrid
    assert pull("Deployment/frontend") == ["regcred"]
    assert pull("Deployment/router") == ["registry-example-readonly"]  # discovery off
    assert pull("StatefulSet/nats") == ["hub"]  # nats:2.10-alpine is Docker Hub's
    assert pull("StatefulSet/etcd") == []  # quay.io: no secret for it


def test_registry_hosts_of_images_and_docker_config_secrets() -> None:
    assert image_registry("nats:2.10-alpine") == "docker.io"
    assert image_registry("library/nats") == "docker.io"
    assert image_registry("localhost:5000/servegrid") == "localhost:5000"
    assert image_registry("Registry.Example.com/ml/servegrid:1") == "registry.example.com"
    auths = {"auths": {"https://index.docker.io/v1/": {}, "ghcr.io": {}}}
    data = {".dockerconfigjson": base64.b64encode(json.dumps(auths).encode()).decode()}
    assert secret_hosts(DOCKERCONFIGJSON, data) == {"docker.io", "ghcr.io"}
    assert secret_hosts(DOCKERCONFIGJSON, {".dockerconfigjson": "not base64 json"}) == set()
    secrets = [
        RegistrySecret("b", frozenset({"ghcr.io"})),
        RegistrySecret("a", frozenset({"ghcr.io"})),
    ]
    assert pull_secrets_for("ghcr.io/x/y", secrets, True, ["mine", "a"]) == ["a", "b", "mine"]
    assert pull_secrets_for("ghcr.io/x/y", secrets, False, ["mine"]) == ["mine"]


def diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            changes += diff(old.get(key), new.get(key), f"{path}.{key}")
        return changes
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            c
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for c in diff(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def test_one_more_decode_worker_changes_only_that_deployments_replicas(tmp_path: Path) -> None:
    before = manifests(run_k8s({f"{PROJECT}:graphConfig": graph_with_workers(tmp_path, 2)}))
    after = manifests(run_k8s({f"{PROJECT}:graphConfig": graph_with_workers(tmp_path, 3)}))
    assert set(before) == set(after)
    changes = [f"{name}{c}" for name in before for c in diff(before[name], after[name])]
    assert changes == ["Deployment/worker.spec.replicas: 2 -> 3"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({f"{PROJECT}:clusterSecret": None}, "servegrid-k8s:clusterSecret is not set"),
        (
            {f"{PROJECT}:components": {"Decoder": {"image": "x"}}},
            "servegrid-k8s:components.Decoder: no process group or service 'Decoder'",
        ),
        (
            {f"{PROJECT}:components": {"Worker": {"rdma": {"resource": "no slash"}}}},
            "servegrid-k8s:components.Worker.rdma.resource",
        ),
        ({f"{PROJECT}:image": None}, "servegrid-k8s:image: Field required"),
        ({f"{PROJECT}:namespace": "Serve_Grid"}, "servegrid-k8s:namespace"),
    ],
)
def test_bad_stack_config_fails_with_a_clear_message_before_any_resource(
    overrides: dict, message: str
) -> None:
    mocks = RecordingMocks()
    with pytest.raises(StackConfigError) as failure:
        run_k8s(overrides, mocks)
    assert message in str(failure.value)
    assert mocks.resources == []


def test_a_graph_config_that_does_not_parse_fails_before_any_resource(tmp_path: Path) -> None:
    broken = tmp_path / "graph.yaml"
    broken.write_text("graph: servegrid.graphs.agg:Frontend\nWorker:\n  engine: [mocker\n")
    mocks = RecordingMocks()
    with pytest.raises(StackConfigError) as failure:
        run_k8s({f"{PROJECT}:graphConfig": str(broken)}, mocks)
    assert f"graph config {broken}" in str(failure.value)
    assert "malformed YAML" in str(failure.value)
    assert mocks.resources == []


def test_the_program_entry_point_runs_without_a_cluster_to_discover_secrets_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))

    def main() -> None:
        runpy.run_path(str(K8S / "__main__.py"), run_name="__main__")

    config = example_config(K8S, {f"{PROJECT}:clusterSecret": CLUSTER_SECRET})
    run = run_program(PROJECT, config, main)
    assert len(run.mocks.of_type(DEPLOYMENT)) == 3


def _worker_class() -> type:
    from servegrid.components.worker import Worker

    return Worker


def _merged(config_name: str) -> dict:
    from servegrid.cli.loader import load_graph

    return load_graph(None, REPO / "configs" / config_name, [], REPO).config
