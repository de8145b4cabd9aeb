#!/usr/bin/env python3
"""Wait until a host's servegrid instances are (or are no longer) registered in discovery.

Run on a node with servegrid installed (ETCD_ENDPOINTS in the environment). Reads discovery
with `servegrid status --json` every half second until the condition holds or the timeout
passes; prints what it saw as JSON; exits 1 with a readable reason on timeout.

  wait_registered.py --servegrid BIN --host ADDR --graph graph.yaml --expect A,B@EPOCH ...
  wait_registered.py --servegrid BIN --host ADDR --absent
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def registered(servegrid: str) -> list[dict]:
    result = subprocess.run(
        [servegrid, "status", "--json"], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"servegrid status exited {result.returncode}")
    return json.loads(result.stdout)


def missing(entries: list[dict], host: str, wanted: dict[str, tuple[int, float]]) -> dict[str, str]:
    problems = {}
    for component, (count, since) in wanted.items():
        have = [
            e
            for e in entries
            if e["host"] == host
            and e["component"] == component
            and (e.get("registered_at") or 0) >= since
        ]
        # Several endpoints of one instance count once.
        instances = {e["instance_id"] for e in have}
        if len(instances) < count:
            problems[component] = f"{len(instances)} of {count} instance(s) registered"
    return problems


def wanted_instances(graph_file: str, services: list[str]) -> dict[str, int]:
    """How many instances of each service a `servegrid serve --service-name` starts."""
    from pathlib import Path

    from servegrid.cli.loader import load_graph
    from servegrid.sdk.layered_config import effective_service_args

    loaded = load_graph(None, Path(graph_file), [], Path.cwd(), services)
    return {
        name: int(effective_service_args(loaded.graph.get(name), loaded.config)["workers"])
        for name in services
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servegrid", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--absent", action="store_true")
    parser.add_argument("--graph", help="graph config the services were started from")
    parser.add_argument(
        "--expect",
        action="append",
        default=[],
        help="SERVICE[,SERVICE...]@EPOCH: instances of these registered at or after EPOCH",
    )
    args = parser.parse_args()
    since: dict[str, float] = {}
    for item in args.expect:
        names, _, at = item.partition("@")
        for name in names.split(","):
            since[name] = float(at or 0)
    counts = wanted_instances(args.graph, list(since)) if since else {}
    wanted = {name: (counts[name], since[name]) for name in since}
    deadline = time.monotonic() + args.timeout
    problems: dict[str, str] = {}
    while True:
        try:
            entries = registered(args.servegrid)
            if args.absent:
                left = sorted({e["component"] for e in entries if e["host"] == args.host})
                problems = {c: "still registered" for c in left}
            else:
                problems = missing(entries, args.host, wanted)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
            problems = {"discovery": str(error)}
        if not problems:
            print(
                json.dumps({"host": args.host, "registered": {k: v[0] for k, v in wanted.items()}})
            )
            return 0
        if time.monotonic() > deadline:
            detail = "; ".join(f"{k}: {v}" for k, v in problems.items())
            state = "still registered" if args.absent else "not registered"
            print(
                f"{args.host}: instances {state} after {args.timeout:.0f}s ({detail}); "
                f"see `journalctl -u 'servegrid-*'` on that host",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
