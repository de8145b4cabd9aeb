"""Run a stack program in-process under Pulumi's mocks, as `pulumi preview` would, no cloud.

The config comes from the stack's example file (``Pulumi.example.yaml``), the file a user
copies, turned into what the Pulumi CLI hands a program: ``project:key`` → text, JSON for
structured values.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml

REPO = Path(__file__).resolve().parents[2]
STACKS = REPO / "stacks"


@dataclass
class Declared:
    """One resource the program declared: its type token, name and inputs."""

    typ: str
    name: str
    inputs: dict[str, Any]


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    resources: list[Declared] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    _next_ip: int = 10

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        self.resources.append(Declared(args.typ, args.name, dict(args.inputs)))
        state = dict(args.inputs)
        # Physical names default to the logical name plus a suffix; the name is enough here.
        state.setdefault("name", args.name)
        if args.typ == "aws:ec2/instance:Instance":
            # Addresses as EC2 gives them: a private one always, a public one when asked for.
            self._next_ip += 1
            state["privateIp"] = f"10.42.0.{self._next_ip}"
            state["publicIp"] = (
                f"198.51.100.{self._next_ip}" if args.inputs.get("associatePublicIpAddress") else ""
            )
        elif args.typ == "aws:ec2/launchTemplate:LaunchTemplate":
            state["latestVersion"] = 1
        elif args.typ == "aws:ec2/keyPair:KeyPair":
            state["keyName"] = args.name
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        self.calls.append(args.token)
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "architecture": "x86_64"}
        return {}

    def of_type(self, typ: str) -> list[Declared]:
        return [r for r in self.resources if r.typ == typ]

    def named(self, name: str) -> Declared:
        return next(r for r in self.resources if r.name == name)


def example_config(stack_dir: Path, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The stack's Pulumi.example.yaml as the CLI would hand it over, plus ``overrides``."""
    data = yaml.safe_load((stack_dir / "Pulumi.example.yaml").read_text())["config"]
    data.update(overrides or {})
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in data.items()
        if value is not None
    }


def fresh_graph_modules() -> None:
    """Forget imported graph modules, as a new `pulumi up` process would.

    (A graph's ``.link()`` edges belong to its own module, so graphs no longer see each
    other's links; re-importing just starts from a clean module.)
    """
    for name in [m for m in sys.modules if m.startswith("servegrid.graphs.")]:
        del sys.modules[name]


@dataclass
class Run:
    mocks: RecordingMocks
    outputs: dict[str, Any]


def run_program(
    project: str,
    config: dict[str, str],
    build: Callable[[], Any],
    outputs: Callable[[Any], dict[str, pulumi.Output]] | None = None,
    mocks: RecordingMocks | None = None,
) -> Run:
    """Declare the program's resources under mocks; resolve the named outputs."""
    fresh_graph_modules()
    mocks = mocks if mocks is not None else RecordingMocks()
    # Pulumi's mocks need a current event loop; an earlier asyncio test may have closed
    # and unset the one this thread had, so each program gets a fresh one.
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(mocks, project=project, stack="test", preview=False)
    pulumi.runtime.set_all_config(config)
    resolved: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> pulumi.Output:
        stack = build()
        wanted = outputs(stack) if outputs else {}
        return pulumi.Output.all(**wanted).apply(resolved.update) if wanted else None

    program()
    return Run(mocks, resolved)
