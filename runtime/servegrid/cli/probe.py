"""``python -m servegrid.cli.probe SERVICE...``: is this host's copy of each service registered?

A readiness/liveness check for service processes that have no HTTP port of their own
(Kubernetes exec probes): it exits 0 when, for every named service, discovery holds an instance
whose address is this host's advertise address (``SERVEGRID_ADVERTISE_HOST``), 1 when one is
missing, 2 when discovery cannot be read. A worker that loses its registration (its lease
expired and it did not come back) fails the probe, so the orchestrator restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from servegrid.cli.status import EXIT_UNREACHABLE, collect
from servegrid.distributed import env
from servegrid.distributed.backends import described_discovery_from_env

EXIT_MISSING = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servegrid.cli.probe", description=__doc__)
    parser.add_argument("services", nargs="+", help="service (component) names, e.g. Worker")
    parser.add_argument("--namespace", help="only this graph namespace")
    parser.add_argument(
        "--host",
        help=f"address the instances registered with (default: ${env.SERVEGRID_ADVERTISE_HOST})",
    )
    args = parser.parse_args(argv)

    host = args.host or os.environ.get(env.SERVEGRID_ADVERTISE_HOST, "").strip()
    if not host:
        print(
            f"probe: no --host and {env.SERVEGRID_ADVERTISE_HOST} is not set; set it to the "
            "address this pod or node registers with",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    from servegrid.distributed.discovery.etcd import EtcdUnavailableError
    from servegrid.distributed.errors import SetupError

    try:
        discovery, source = described_discovery_from_env()
        entries = asyncio.run(collect(discovery, args.namespace))
    except (EtcdUnavailableError, SetupError, ValueError) as error:
        print(f"probe: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    here = {e.component for e in entries if e.host == host}
    missing = [s for s in args.services if s not in here]
    if missing:
        print(f"probe: {', '.join(missing)} not registered from {host} ({source})", file=sys.stderr)
        return EXIT_MISSING
    return 0


if __name__ == "__main__":
    sys.exit(main())
