"""The testbed as a whole: bring N nodes up, tear everything down, report, inject faults.

All state lives on disk under the state dir (node dirs, PIDs, key, inventory), so separate
commands (`up`, then `stop node2`, then `down`) act on the same testbed, and `down` can clean up
after a run that failed half way: it also searches the host for anything named like ours.
"""

from __future__ import annotations

import fcntl
import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import base as base_image
from . import inventory, network
from .config import TestbedConfig
from .node import Node, wait_ready
from .system import (
    TestbedError,
    mounts_under,
    nspawn_pids_under,
    pids_in_netns,
    preflight_problems,
    remove_tree,
    run,
    signal_pid,
    unmount_all_under,
    wait_gone,
)


@dataclass(frozen=True)
class UpResult:
    nodes: list[Node]
    base: Path
    base_built: bool
    inventory: Path
    seconds: float


@dataclass(frozen=True)
class NodeStatus:
    name: str
    ip: str
    state: str  # running | booting | cut | stopped
    pid: int | None


class Testbed:
    """Operations on the testbed described by `cfg` (default: from the environment)."""

    __test__ = False

    def __init__(
        self, cfg: TestbedConfig | None = None, progress: Callable[[str], None] | None = None
    ) -> None:
        self.cfg = cfg or TestbedConfig.from_env()
        self.progress = progress or (lambda _msg: None)

    # -- lookup ----------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        """Nodes that exist in the state dir, in index order."""
        found = []
        for d in (self.cfg.state_dir / "nodes").glob("node*"):
            if d.name[4:].isdigit():
                found.append(Node(self.cfg, int(d.name[4:])))
        return sorted(found, key=lambda n: n.index)

    def node(self, name: str) -> Node:
        for n in self.nodes():
            if name in (n.name, str(n.index), n.ip):
                return n
        known = ", ".join(n.name for n in self.nodes()) or "none (run `up N` first)"
        raise TestbedError(f"no node {name!r} in {self.cfg.state_dir}; nodes: {known}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cfg.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _base(self) -> Path:
        try:
            state = json.loads((self.cfg.state_dir / "state.json").read_text())
            return Path(state["base"])
        except (OSError, ValueError, KeyError) as exc:
            raise TestbedError(
                f"no testbed state in {self.cfg.state_dir}; run `up N` first"
            ) from exc

    # -- lifecycle -------------------------------------------------------------------------

    def up(self, count: int, inventory_copy: Path | None = None) -> UpResult:
        """Make nodes 1..count exist and answer SSH; nodes already running are left alone."""
        if problems := preflight_problems():
            raise TestbedError("cannot start test nodes: " + "; ".join(problems))
        if not 1 <= count <= self.cfg.max_nodes:
            raise TestbedError(
                f"node count {count} out of range 1..{self.cfg.max_nodes} for {self.cfg.subnet}"
            )
        started = time.monotonic()
        base, built = base_image.ensure_base(self.cfg, self.progress)
        with self._locked():
            (self.cfg.state_dir / "state.json").write_text(json.dumps({"base": str(base)}))
            self._ensure_key()
            network.ensure_bridge(self.cfg)
            wanted = [Node(self.cfg, i) for i in range(1, count + 1)]
            everyone = sorted(
                {n.index: n for n in [*self.nodes(), *wanted]}.values(), key=lambda n: n.index
            )
            public_key = self.cfg.key_path.with_suffix(".pub").read_text()
            for node in wanted:
                if node.pid() is None:
                    self.progress(f"starting {node.name} ({node.ip})")
                self._prepare(node, base, public_key)
            for node in everyone:
                node.write_hosts(everyone)
            self.progress(f"waiting for SSH on {len(wanted)} node(s)")
            wait_ready(wanted, self.cfg.boot_timeout_s)
            path = inventory.write(self.cfg, everyone, inventory_copy)
        return UpResult(wanted, base, built, path, round(time.monotonic() - started, 1))

    def _ensure_key(self) -> None:
        if not self.cfg.key_path.exists():
            run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "servegrid-testbed",
                    "-f",
                    str(self.cfg.key_path),
                ]
            )

    def _prepare(self, node: Node, base: Path, public_key: str) -> None:
        node.mount_root(base)
        node.install_key(public_key)
        netns = network.ensure_node_link(self.cfg, node.name, node.ip)
        node.start(netns)

    def down(self) -> None:
        """Remove every process, mount, namespace, link and file the testbed made."""
        cfg = self.cfg
        pids = nspawn_pids_under(cfg.state_dir)
        if pids:
            self.progress(f"powering off {len(pids)} node(s)")
        for pid in pids:
            signal_pid(pid, signal.SIGTERM)  # clean poweroff of each container
        wait_gone(pids, cfg.stop_timeout_s)
        # Whatever did not power off, and any container orphaned by a killed nspawn.
        rest = nspawn_pids_under(cfg.state_dir) + self._container_pids()
        for pid in rest:
            signal_pid(pid, signal.SIGKILL)
        if left := wait_gone(rest, 15):
            raise TestbedError(f"node processes {left} survive SIGKILL; see `ps -p`")
        unmount_all_under(cfg.state_dir)
        network.remove_all(cfg)
        remove_tree(cfg.state_dir)
        if leaks := self.leftovers():
            raise TestbedError("teardown left behind: " + "; ".join(leaks))

    def _container_pids(self) -> list[int]:
        namespaces, _ = network.ours(self.cfg)
        return [pid for ns in namespaces for pid in pids_in_netns(ns)]

    def leftovers(self) -> list[str]:
        """Anything of this testbed still on the host; empty after a clean `down`."""
        cfg = self.cfg
        found = []
        if pids := nspawn_pids_under(cfg.state_dir):
            found.append(f"nspawn processes {pids}")
        if inside := self._container_pids():
            found.append(f"container processes {inside}")
        if mounts := mounts_under(cfg.state_dir):
            found.append(f"mounts {mounts}")
        namespaces, links = network.ours(cfg)
        if namespaces:
            found.append(f"network namespaces {namespaces}")
        if links:
            found.append(f"links {links}")
        if cfg.state_dir.exists():
            found.append(f"state dir {cfg.state_dir}")
        return found

    def status(self) -> list[NodeStatus]:
        rows = []
        for node in self.nodes():
            pid = node.pid()
            if pid is None:
                state = "stopped"
            elif not network.link_is_up(self.cfg.netns(node.name)):
                state = "cut"
            else:
                state = "running" if node.port_open(timeout=0.5) else "booting"
            rows.append(NodeStatus(node.name, node.ip, state, pid))
        return rows

    # -- faults ----------------------------------------------------------------------------

    def stop(self, name: str) -> None:
        """Crash a node: SIGKILL its nspawn; all its processes are gone on return."""
        self.node(name).stop(hard=True)

    def start(self, name: str) -> None:
        """Boot a stopped node again (same disk) and wait for SSH."""
        node = self.node(name)
        with self._locked():
            self._prepare(node, self._base(), self.cfg.key_path.with_suffix(".pub").read_text())
        wait_ready([node], self.cfg.boot_timeout_s)

    def cut(self, name: str) -> None:
        """Take a node's link down: it keeps running but nothing reaches it."""
        network.set_link(self.cfg, self.node(name).name, up=False)

    def restore(self, name: str) -> None:
        network.set_link(self.cfg, self.node(name).name, up=True)
