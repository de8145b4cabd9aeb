"""LoRA adapters as a graph config declares them and as workers announce them.

A Worker's config (or ``Common``, through ``common-configs``) names the adapters it loads at
start, ``lora-adapters: {name: path}``; a path is a PEFT-format directory on the worker's
host (``adapter_config.json`` + ``adapter_model.safetensors``). More are loaded at run time
through the Worker's ``load_lora`` endpoint (``servegrid lora load``). A worker lists the
adapters it holds in its discovery metadata under ``LORA_METADATA_KEY``: the frontend serves
them as models and the routers send an adapter's requests only to workers that hold it.

An adapter's name is what clients put in a request's ``model``; it also salts the KV block
hashes of its requests (``llm.kv_hash``), so one name must mean the same weights on every
worker of a deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from servegrid.engines.base import EngineConfigError

#: the graph config key (Worker, or Common through common-configs)
LORA_ADAPTERS_KEY = "lora-adapters"
#: the key of a worker's discovery metadata that lists the adapters it holds
LORA_METADATA_KEY = "lora_adapters"


def adapters_from_config(config: Mapping[str, Any], where: str) -> dict[str, str]:
    """The ``lora-adapters`` mapping of a service config, checked; {} when absent."""
    raw = config.get(LORA_ADAPTERS_KEY, config.get(LORA_ADAPTERS_KEY.replace("-", "_")))
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise EngineConfigError(
            f"{where}: {LORA_ADAPTERS_KEY} must map adapter names to adapter directories, "
            f"like {{my-adapter: /models/my-adapter}}; got {raw!r}"
        )
    adapters: dict[str, str] = {}
    for name, path in raw.items():
        check_adapter(name, path, where)
        adapters[str(name)] = str(path)
    return adapters


def check_adapter(name: Any, path: Any, where: str) -> None:
    """An adapter's name and path are non-empty strings (numbers are fine as names)."""
    if not isinstance(name, str | int) or not str(name).strip():
        raise EngineConfigError(f"{where}: a LoRA adapter name must be a non-empty string")
    if str(name) != str(name).strip():
        raise EngineConfigError(
            f"{where}: LoRA adapter name {str(name)!r} has leading or trailing spaces"
        )
    if not isinstance(path, str) or not path.strip():
        raise EngineConfigError(
            f"{where}: LoRA adapter {name!r} needs the path of its directory, got {path!r}"
        )


def adapters_of(metadata: Mapping[str, Any]) -> list[str]:
    """The adapters a worker's discovery metadata says it holds."""
    value = metadata.get(LORA_METADATA_KEY)
    return [str(v) for v in value] if isinstance(value, list) else []


def holders(instances: Iterable[Any], lora_name: str) -> list[int]:
    """Instance ids, among ``instances`` (``InstanceInfo``s), that hold ``lora_name``."""
    return [i.instance_id for i in instances if lora_name in adapters_of(i.metadata)]
