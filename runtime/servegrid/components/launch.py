"""Start components from flags, in the Kubernetes launch style, without a graph config.

    python -m servegrid.frontend --http-port 8000 --router-mode round-robin --model DIR
    python -m servegrid.worker --engine mocker --model DIR --speedup-ratio 10

A flag ``--some-key VALUE`` is the config key ``some-key`` of the services started (each
takes the keys it knows), so every setting keeps one name whether it comes from a graph
config or a flag. A few flags have launch-style aliases, listed in ``ALIASES``.
"""

from __future__ import annotations

from typing import Any

from servegrid.sdk.config import SERVICE_ARGS, ServiceConfig
from servegrid.sdk.errors import UserError
from servegrid.sdk.host import host_until_signal, run_main
from servegrid.sdk.layered_config import _parse_value
from servegrid.sdk.service import spec_of

ALIASES = {"http-port": "port", "http-host": "host", "router-mode": "router"}
SERVICE_ARG_FLAGS = ("namespace",)


def parse_flags(argv: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}: flags look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                value = argv[i]
            else:
                value = "true"
        settings[ALIASES.get(key, key)] = _parse_value(value)
        i += 1
    return settings


def build_config(service_classes: list[type], settings: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    service_args = {k: settings.pop(k) for k in SERVICE_ARG_FLAGS if k in settings}
    for cls in service_classes:
        section = dict(settings)
        if service_args:
            section[SERVICE_ARGS] = dict(service_args)
        config[spec_of(cls).name] = section
    return config


def launch(service_classes: list[type], argv: list[str], usage: str) -> None:
    """Run ``service_classes`` in this process with config from ``argv`` until SIGTERM."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return

    async def main() -> None:
        config = ServiceConfig.set_instance(build_config(service_classes, parse_flags(argv)))
        await host_until_signal([spec_of(cls) for cls in service_classes], config)

    run_main(main)
