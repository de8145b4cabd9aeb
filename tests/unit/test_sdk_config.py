"""Layered config: precedence, Common, ServiceArgs, as_args, require, dry-run, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from servegrid.sdk.config import ServiceConfig
from servegrid.sdk.errors import ConfigError, GraphError
from servegrid.sdk.graph import import_service, links_of_module, resolve, resolve_ref
from servegrid.sdk.layered_config import (
    constructor_kwargs,
    effective_service_args,
    merge_config,
    parse_overrides,
)
from tests.unit.graphs.shapes import Entry, Leaf

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "graph.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(autouse=True)
def fresh_links():
    """Edges this test module states (with ``link``) are its own; start each test bare."""
    links_of_module(sys.modules[__name__]).clear()
    yield
    links_of_module(sys.modules[__name__]).clear()


def test_precedence_cli_over_yaml_over_decorator_over_constructor():
    graph = resolve(Entry)
    yaml_cfg = {"Leaf": {"model": "from-yaml", "block-size": 32}}
    merged = merge_config(graph, yaml_cfg, parse_overrides(["--Leaf.block-size=64"]))
    leaf = merged["Leaf"]
    assert leaf["model"] == "from-yaml"  # YAML
    assert leaf["block-size"] == 64  # CLI beats YAML
    assert leaf["level"] == "decorator"  # @service(...) beats the constructor default
    kwargs = constructor_kwargs(graph.get("Leaf"), leaf)
    assert kwargs == {"model": "from-yaml", "block_size": 64, "level": "decorator"}
    instance = Leaf(**kwargs)
    assert (instance.block_size, instance.level) == (64, "decorator")
    # and a key no layer sets keeps the constructor default
    assert Entry(**constructor_kwargs(graph.get("Entry"), merged["Entry"])).port == 8000


def test_yaml_beats_decorator_setting():
    merged = merge_config(resolve(Entry), {"Leaf": {"model": "m", "level": "yaml"}}, {})
    assert merged["Leaf"]["level"] == "yaml"


def test_common_is_merged_only_into_services_that_list_it_and_own_values_win():
    yaml_cfg = {
        "Common": {"model": "common-model", "block-size": 16},
        "Leaf": {"common-configs": ["model", "block-size"], "block-size": 128},
        "Middle": {},
    }
    merged = merge_config(resolve(Entry), yaml_cfg, {})
    assert merged["Leaf"]["model"] == "common-model"
    assert merged["Leaf"]["block-size"] == 128
    assert "model" not in merged["Middle"]


def test_common_key_that_does_not_exist_is_an_error():
    with pytest.raises(ConfigError, match="'Common' has no such key"):
        merge_config(resolve(Entry), {"Common": {}, "Leaf": {"common-configs": ["model"]}}, {})


def test_service_args_override_the_decorator():
    graph = resolve(Entry)
    merged = merge_config(
        graph,
        {"Leaf": {"model": "m", "ServiceArgs": {"workers": 3, "resources": {"gpu": 2}}}},
        parse_overrides(["--Leaf.ServiceArgs.namespace=staging"]),
    )
    args = effective_service_args(graph.get("Leaf"), merged)
    assert args == {
        "namespace": "staging",
        "resources": {"gpu": 2},
        "workers": 3,
        "drain-timeout": 30.0,
    }
    # and without ServiceArgs the decorator's values stand
    plain = effective_service_args(graph.get("Leaf"), {"Leaf": {}})
    assert plain == {
        "namespace": "shapes",
        "resources": {"gpu": 1},
        "workers": 1,
        "drain-timeout": 30.0,
    }


def test_bad_worker_count_is_a_config_error():
    with pytest.raises(ConfigError, match="workers must be a positive integer"):
        effective_service_args(
            resolve(Entry).get("Leaf"), {"Leaf": {"ServiceArgs": {"workers": 0}}}
        )


def test_overrides_parse_types_and_nesting():
    parsed = parse_overrides(
        ["--A.n=2", "--A.flag", "--A.name", "x", "--B.ServiceArgs.workers=4", "--A.list=[1, 2]"]
    )
    assert parsed == {
        "A": {"n": 2, "flag": True, "name": "x", "list": [1, 2]},
        "B": {"ServiceArgs": {"workers": 4}},
    }
    with pytest.raises(ConfigError, match=r"--Service\.key=value"):
        parse_overrides(["positional"])


def test_override_of_a_service_outside_the_graph_is_rejected():
    with pytest.raises(ConfigError, match="'Nope' is not in the graph"):
        merge_config(resolve(Entry), {}, parse_overrides(["--Nope.x=1"]))


def test_as_args_flags_prefix_and_reserved_keys():
    config = ServiceConfig(
        {
            "Worker": {
                "model": "m",
                "enforce-eager": True,
                "disabled": False,
                "block-size": 64,
                "lib_option1": "value1",
                "lib_flag2": True,
                "common-configs": ["model"],
                "ServiceArgs": {"workers": 2},
            }
        }
    )
    assert config.as_args("Worker") == [
        "--model", "m", "--enforce-eager", "--block-size", "64",
        "--lib_option1", "value1", "--lib_flag2",
    ]  # fmt: skip
    assert config.as_args("Worker", prefix="lib_") == ["--option1", "value1", "--flag2"]
    assert config.as_args("Missing") == []


def test_require_names_service_and_key():
    config = ServiceConfig({"Worker": {"model": "m"}})
    assert config.require("Worker", "model") == "m"
    with pytest.raises(
        ConfigError, match=r"service 'Worker' requires config key 'api_key'.*--Worker.api_key"
    ):
        config.require("Worker", "api_key")
    assert config.get("Worker", {}).get("model") == "m"  # seed-style dict access


def test_depends_edges_and_link_pruning():
    full = resolve(Entry)
    assert full.edges["Middle"] == ["Leaf", "Router"]
    assert set(full.names()) == {"Entry", "Middle", "Leaf", "Router"}

    Entry.link(Leaf)  # Entry keeps only Leaf: Middle and Router leave the graph
    pruned = resolve(Entry)
    assert pruned.names() == ["Leaf", "Entry"]


def test_seed_link_chain_prunes_the_unlinked_router():
    graph = resolve_ref("tests.unit.graphs.linked:Entry")
    assert graph.edges == {"Entry": ["Middle"], "Middle": ["Leaf"], "Leaf": []}
    assert "Router" not in graph.names()
    assert graph.names()[0] == "Leaf"  # dependencies start first
    # The chain belongs to the module that states it: here, Entry keeps all its edges.
    assert "Router" in resolve(Entry).names()


def test_importing_one_graph_module_does_not_change_another():
    agg = resolve_ref("servegrid.graphs.agg:Frontend")
    router = resolve_ref("servegrid.graphs.agg_router:Frontend")
    again = resolve_ref("servegrid.graphs.agg:Frontend")
    assert agg.edges == again.edges
    assert agg.edges["Processor"] == ["Worker"]
    assert "Router" not in agg.names()
    assert router.edges["Processor"] == ["Router"]
    assert router.edges["Router"] == ["Worker"]


def test_link_to_a_service_that_is_not_a_dependency_is_an_error():
    from tests.unit.graphs.shapes import Lonely

    with pytest.raises(GraphError, match=r"Entry has no depends\(Lonely\)"):
        Entry.link(Lonely)


def test_cycle_is_reported_with_its_path():
    from tests.unit.graphs.shapes import CycleA

    with pytest.raises(GraphError, match="cycle in depends: CycleA -> CycleB -> CycleA"):
        resolve(CycleA)


def test_import_errors_are_graph_errors():
    with pytest.raises(GraphError, match="no module named 'no_such_module'"):
        import_service("no_such_module:Thing")
    with pytest.raises(GraphError, match="has no 'Nope'"):
        import_service("tests.unit.graphs.shapes:Nope")
    with pytest.raises(GraphError, match="module:Class"):
        import_service("justaname")


def test_address_uses_service_args_namespace():
    ServiceConfig.set_instance({"Leaf": {"ServiceArgs": {"namespace": "prod"}}})
    try:
        assert Leaf.address() == ("prod", "Leaf")
    finally:
        ServiceConfig.set_instance(None)
    assert Leaf.address() == ("shapes", "Leaf")


# -- the CLI, as a user runs it --------------------------------------------------------


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "servegrid.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_dry_run_prints_the_merged_config_and_the_environment_variable(tmp_path):
    config = write(
        tmp_path,
        """
        graph: tests.unit.graphs.shapes:Entry
        Common: {model: tiny}
        Leaf: {common-configs: [model], block-size: 32}
        Entry: {port: 9000}
        """,
    )
    result = run_cli("serve", "-f", str(config), "--dry-run", "--Leaf.block-size=48")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Service Configuration:\n")
    body, _, env_part = out.partition("Environment Variable that would be set:\n")
    merged = json.loads(body.removeprefix("Service Configuration:\n"))
    assert merged["Leaf"]["model"] == "tiny"
    assert merged["Leaf"]["block-size"] == 48
    assert merged["Entry"]["port"] == 9000
    name, _, value = env_part.strip().partition("=")
    assert name == "SERVEGRID_SERVICE_CONFIG"
    assert json.loads(value) == merged


@pytest.mark.parametrize(
    ("yaml_text", "extra", "message"),
    [
        ("graph: x\nLeaf: [unclosed\n", [], r"graph.yaml:\d+:\d+: malformed YAML"),
        (
            "graph: tests.unit.graphs.shapes:Entry\nLeaf: {model: m}\n",
            ["--Ghost.x=1"],
            "'Ghost' is not in the graph",
        ),
        ("graph: no.such.module:Entry\n", [], "cannot import graph 'no.such.module:Entry'"),
        (
            "graph: tests.unit.graphs.shapes:CycleA\n",
            [],
            "cycle in depends: CycleA -> CycleB -> CycleA",
        ),
        (
            "graph: tests.unit.graphs.shapes:Entry\n",
            [],
            "service 'Leaf' requires config key 'model'",
        ),
        ("Leaf: {model: m}\n", [], "has no 'graph:' key"),
    ],
    ids=["malformed-yaml", "unknown-service", "unimportable", "cycle", "missing-key", "no-graph"],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, yaml_text, extra, message):
    config = tmp_path / "graph.yaml"
    config.write_text(yaml_text)
    result = run_cli("serve", "-f", str(config), "--dry-run", *extra)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]


def test_graph_command_prints_the_tree(tmp_path):
    config = write(
        tmp_path,
        "graph: tests.unit.graphs.shapes:Entry\nLeaf: {model: m, ServiceArgs: {workers: 2}}\n",
    )
    result = run_cli("graph", "-f", str(config))
    assert result.returncode == 0, result.stderr
    assert "Entry" in result.stdout and "Router" in result.stdout
    assert "workers=2" in result.stdout and "gpu=1" in result.stdout


def _dry_run_config(*args: str) -> dict:
    result = run_cli("serve", *args, "--dry-run")
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("Service Configuration:\n", 1)[1]
    return json.loads(text.split("\n\nEnvironment Variable", 1)[0])


def test_a_common_override_reaches_every_service_that_lists_the_key():
    agg = str(REPO / "configs" / "agg.yaml")
    config = _dry_run_config("-f", agg, "--Common.model=/models/other")
    assert config["Worker"]["model"] == "/models/other"
    assert config["Processor"]["model"] == "/models/other"
    assert "model" not in config["Frontend"]  # it does not list model
    # A service's own override still wins over Common.
    config = _dry_run_config("-f", agg, "--Common.model=/c", "--Worker.model=/w")
    assert (config["Worker"]["model"], config["Processor"]["model"]) == ("/w", "/c")


def test_a_common_override_that_would_change_nothing_is_refused():
    result = run_cli("serve", "-f", str(REPO / "configs" / "agg.yaml"), "--Common.nope=1")
    assert result.returncode == 2
    assert "--Common.nope" in result.stderr and "common-configs" in result.stderr
    assert "Traceback" not in result.stderr


def test_common_override_beats_a_services_yaml_value():
    graph = resolve(Entry)
    yaml_cfg = {
        "Common": {"model": "yaml-common"},
        "Leaf": {"model": "leaf-yaml", "common-configs": ["model"]},
    }
    assert merge_config(graph, yaml_cfg, {})["Leaf"]["model"] == "leaf-yaml"
    merged = merge_config(graph, yaml_cfg, parse_overrides(["--Common.model=cli"]))
    assert merged["Leaf"]["model"] == "cli"
