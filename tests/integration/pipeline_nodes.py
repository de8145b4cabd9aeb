"""The example pipeline served as two nodes would run it, against real etcd and NATS.

Node A (``127.0.0.2``) runs ``servegrid serve --service-name Ingress,Counter``, node B
(``127.0.0.3``) runs ``--service-name Shouter`` with its two workers. Each node binds and
advertises its own loopback address, so every call between them crosses "the network" the way
it would between hosts. The test process calls Ingress through its own ``DistributedRuntime``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from servegrid.distributed import env
from servegrid.distributed.discovery.base import InstanceInfo, instance_prefix
from servegrid.distributed.runtime import DistributedRuntime
from tests.support.procs import children_of, env_of
from tests.support.serving import REPO, ServedGraph, serve

PIPELINE = REPO / "examples" / "pipeline"
ARGS = ["-f", str(PIPELINE / "pipeline.yaml"), "--working-dir", str(PIPELINE)]
NAMESPACE = "pipeline"
NODE_A = "127.0.0.2"  # Ingress and Counter
NODE_B = "127.0.0.3"  # Shouter, two workers
LEASE_TTL = 3.0
REQUEST_TIMEOUT = 10.0


def node_env(cluster_env: dict[str, str], host: str) -> dict[str, str]:
    return {**cluster_env, env.SERVEGRID_ADVERTISE_HOST: host, env.SERVEGRID_BIND_HOST: host}


@contextmanager
def two_nodes(
    cluster_env: dict[str, str], shouter_args: tuple[str, ...] = ()
) -> Iterator[tuple[ServedGraph, ServedGraph]]:
    """Start both nodes and wait until every service said it is ready; always stop both."""
    with ExitStack() as stack:
        node_a = stack.enter_context(
            serve([*ARGS, "--service-name", "Ingress,Counter"], node_env(cluster_env, NODE_A))
        )
        node_b = stack.enter_context(
            serve(
                [*ARGS, "--service-name", "Shouter", *shouter_args], node_env(cluster_env, NODE_B)
            )
        )
        node_a.wait_for_output("Ingress ready", timeout=60)
        node_a.wait_for_output("Counter ready", timeout=60)
        node_b.wait_for_output("Shouter ready", count=2, timeout=60)
        yield node_a, node_b


def service_children(supervisor_pid: int) -> dict[str, int]:
    """``Service:worker`` (from the child's environment) → pid, for a supervisor's children."""
    found = {}
    for pid in children_of(supervisor_pid):
        child_env = env_of(pid)
        if env.SERVEGRID_SERVICES in child_env:
            label = f"{child_env[env.SERVEGRID_SERVICES]}:{child_env[env.SERVEGRID_WORKER_INDEX]}"
            found[label] = pid
    return found


async def registered(runtime: DistributedRuntime) -> list[InstanceInfo]:
    return await runtime.discovery.list(instance_prefix(NAMESPACE))


async def endpoint_client(runtime: DistributedRuntime, component: str, endpoint: str, count: int):
    client = await runtime.namespace(NAMESPACE).component(component).endpoint(endpoint).client()
    await client.wait_for_instances(count, timeout=30)
    return client


async def call_ingress(client, text: str) -> dict:
    async def once() -> dict:
        return await (await client.round_robin(text)).single()

    return await asyncio.wait_for(once(), REQUEST_TIMEOUT)


async def servegrid_status_json(cluster_env: dict[str, str]) -> str:
    """``servegrid status --json -n pipeline`` as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "servegrid.cli",
        "status",
        "--json",
        "--namespace",
        NAMESPACE,
        env={**os.environ, **cluster_env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


@dataclass
class Outcome:
    started: float
    ended: float
    pids: list[int] = field(default_factory=list)
    error: str = ""


@dataclass
class Load:
    """A bounded request loop against Ingress: ``callers`` concurrent callers, each sending
    requests back to back (``pause`` seconds apart) until ``stop`` or the bounds."""

    client: object
    callers: int = 4
    pause: float = 0.0
    max_requests: int = 2000
    max_seconds: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def _caller(self, index: int, deadline: float) -> None:
        n = 0
        while (
            not self.stop.is_set()
            and len(self.outcomes) < self.max_requests
            and time.monotonic() < deadline
        ):
            started = time.monotonic()
            try:
                reply = await call_ingress(self.client, f"caller {index} request {n}")
                outcome = Outcome(started, time.monotonic(), reply["shouter_pids"])
            except Exception as error:  # every failure is recorded and asserted on
                outcome = Outcome(
                    started, time.monotonic(), error=f"{type(error).__name__}: {error}"
                )
            self.outcomes.append(outcome)
            self._progress.set()
            n += 1
            if self.pause:
                await asyncio.sleep(self.pause)

    async def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        await asyncio.gather(*(self._caller(i, deadline) for i in range(self.callers)))

    def failures(self) -> list[str]:
        return [o.error for o in self.outcomes if o.error]

    def used_pids(self, since: float = 0.0) -> set[int]:
        return {pid for o in self.outcomes if o.started >= since for pid in o.pids}

    async def until(self, condition, timeout: float, what: str) -> None:
        """Let the load run until ``condition()`` holds (checked as outcomes arrive)."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{what} not reached in {timeout}s; failures: {self.failures()}"
                )
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
