"""Command line of the testbed: `python -m tests.testbed up N | down | status | stop NODE ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import base as base_image
from .config import TestbedConfig
from .core import NodeStatus, Testbed
from .system import TestbedError

# debootstrap prints one line per package per phase; show those only as the spinner text.
_CHATTY = ("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking", "I: Configuring")


class _Progress:
    """Spinner with the latest step on a terminal; plain lines, minus per-package noise, else."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.status = None
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status("testbed")
            self.status.start()

    def __call__(self, msg: str) -> None:
        elapsed = f"[{time.monotonic() - self.started:5.1f}s]"
        if self.status is not None:
            self.status.update(f"{elapsed} {msg}")
            if not msg.startswith(_CHATTY):
                self.status.console.log(msg)
        elif not msg.startswith(_CHATTY):
            print(f"{elapsed} {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


def _status_json(cfg: TestbedConfig, rows: list[NodeStatus]) -> dict:
    return {
        "nodes": [{"name": r.name, "ip": r.ip, "state": r.state, "pid": r.pid} for r in rows],
        "user": "root",
        "key": str(cfg.key_path),
        "inventory": str(cfg.inventory_path),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description="Local systemd-nspawn test nodes for servegrid (needs root). Settings come "
        "from SERVEGRID_TESTBED_* variables; see tests/testbed/README.md.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="make nodes 1..N and wait for SSH (idempotent)")
    up.add_argument("count", type=int)
    up.add_argument("--inventory", type=Path, help="also write the inventory to this path")
    up.add_argument("--wheelhouse", type=Path, help="directory bound read-only at /opt/wheelhouse")
    sub.add_parser("down", help="remove every node, mount, namespace, link and state file")
    st = sub.add_parser("status", help="list nodes, IPs and state")
    st.add_argument("--json", action="store_true", help="machine-readable (for playbooks)")
    sub.add_parser("base", help="build the cached base image (if needed) and print its path")
    for name, text in (
        ("stop", "kill a node hard (SIGKILL of its nspawn)"),
        ("start", "boot a stopped node again"),
        ("cut", "take a node's link down"),
        ("restore", "bring a node's link back up"),
    ):
        sub.add_parser(name, help=text).add_argument("node", help="node1, 1 or its IP")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {}
    if getattr(args, "wheelhouse", None):
        if not args.wheelhouse.is_dir():
            print(f"error: --wheelhouse {args.wheelhouse} is not a directory", file=sys.stderr)
            return 2
        overrides["wheelhouse"] = args.wheelhouse.absolute()
    progress = _Progress()
    cfg = TestbedConfig()
    try:
        cfg = TestbedConfig.from_env(**overrides)
        bed = Testbed(cfg, progress)
        if args.command == "up":
            result = bed.up(args.count, args.inventory)
            progress.close()
            state = "built" if result.base_built else "cached"
            print(f"{len(result.nodes)} node(s) up in {result.seconds}s (base {state})")
            for node in result.nodes:
                print(f"  {node.name}  {node.ip}")
            print(f"inventory: {result.inventory}")
        elif args.command == "down":
            bed.down()
            progress.close()
            print(f"testbed down; removed {cfg.state_dir}")
        elif args.command == "status":
            progress.close()
            rows = bed.status()
            if args.json:
                print(json.dumps(_status_json(cfg, rows)))
                return 0
            if not rows:
                print(f"no nodes (state dir {cfg.state_dir})")
            for row in rows:
                print(f"{row.name:8} {row.ip:15} {row.state:8} pid={row.pid or '-'}")
            if rows:
                print(f"inventory: {cfg.inventory_path}")
        elif args.command == "base":
            path, built = base_image.ensure_base(cfg, progress)
            progress.close()
            print(f"{path} ({'built' if built else 'cached'})")
        else:
            getattr(bed, args.command)(args.node)
            progress.close()
            print(f"{args.command} {args.node}: done")
    except (TestbedError, ValueError) as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        if args.command == "up" and cfg.state_dir.exists():
            print("state is kept for inspection; `down` removes it", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print("interrupted; `down` removes whatever was made", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
