"""``ServiceConfig``: the merged graph config as a service sees it.

The ``servegrid serve`` command merges CLI overrides, the YAML file and the ``Common`` section
once, and hands the result to every process in ``SERVEGRID_SERVICE_CONFIG`` (JSON).
``ServiceConfig.get_instance()`` reads it back; it is a dict of service name → settings.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from servegrid.distributed.env import SERVEGRID_SERVICE_CONFIG
from servegrid.sdk.errors import ConfigError

SERVICE_ARGS = "ServiceArgs"
COMMON_CONFIGS = "common-configs"
#: keys of a service's section that configure the SDK, not the service itself
RESERVED_SERVICE_KEYS = frozenset({SERVICE_ARGS, COMMON_CONFIGS})


class ServiceConfig(dict):
    _instance: ClassVar[ServiceConfig | None] = None

    @classmethod
    def get_instance(cls) -> ServiceConfig:
        if cls._instance is None:
            raw = os.environ.get(SERVEGRID_SERVICE_CONFIG, "")
            try:
                data = json.loads(raw) if raw else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{SERVEGRID_SERVICE_CONFIG} is not valid JSON: {exc}") from exc
            cls._instance = cls(data)
        return cls._instance

    @classmethod
    def set_instance(cls, data: dict[str, Any] | None) -> ServiceConfig:
        """Replace the process-wide config (used by the CLI and by tests)."""
        cls._instance = cls(data or {})
        return cls._instance

    def require(self, service: str, key: str) -> Any:
        section = self.get(service) or {}
        if key not in section:
            raise ConfigError(
                f"service {service!r} requires config key {key!r}: set it under "
                f"'{service}:' in the graph config, or pass --{service}.{key}=VALUE"
            )
        return section[key]

    def settings(self, service: str) -> dict[str, Any]:
        """The service's own keys (without ServiceArgs and common-configs)."""
        section = self.get(service) or {}
        return {k: v for k, v in section.items() if k not in RESERVED_SERVICE_KEYS}

    def service_args(self, service: str) -> dict[str, Any]:
        return dict((self.get(service) or {}).get(SERVICE_ARGS) or {})

    def as_args(self, service: str, prefix: str = "") -> list[str]:
        """The service's settings as ``--key value`` arguments for an external parser.

        With ``prefix``, only keys that start with it are taken, and the prefix is stripped.
        ``True`` becomes a bare flag, ``False`` and ``None`` are left out, lists and dicts
        are passed as JSON.
        """
        args: list[str] = []
        for key, value in self.settings(service).items():
            if prefix:
                if not key.startswith(prefix):
                    continue
                key = key[len(prefix) :]
            if value is None or value is False:
                continue
            args.append(f"--{key}")
            if value is True:
                continue
            args.append(json.dumps(value) if isinstance(value, list | dict) else str(value))
        return args
