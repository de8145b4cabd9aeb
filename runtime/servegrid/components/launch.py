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
from servegrid.sdk.flags import parse_flags
from servegrid.sdk.host import host_until_signal, run_main
from servegrid.sdk.service import spec_of

ALIASES = {"http-port": "port", "http-host": "host", "router-mode": "router"}
SERVICE_ARG_FLAGS = ("namespace",)


def parse_settings(argv: list[str]) -> dict[str, Any]:
    """Launch flags as config keys (``--http-port 8000`` → ``{"port": 8000}``)."""
    if any(arg in ("-h", "--help") for arg in argv):
        raise SystemExit(0)
    return {ALIASES.get(key, key): value for key, value, _ in parse_flags(argv, "--key value")}


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
        config = ServiceConfig.set_instance(build_config(service_classes, parse_settings(argv)))
        await host_until_signal([spec_of(cls) for cls in service_classes], config)

    run_main(main)
