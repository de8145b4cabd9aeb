"""A Worker's config keys → vLLM's ``AsyncEngineArgs``, the way the seed does it.

Every key of the service's config that is a ``vllm serve`` flag (``enforce-eager``,
``block-size``, ``max-model-len``, ``max-num-batched-tokens``, ``enable-prefix-caching``,
``tensor-parallel-size``, ``pipeline-parallel-size``, ``gpu-memory-utilization``,
``distributed-executor-backend``, ``trust-remote-code``, ``kv-transfer-config``, ...) becomes
that flag, and vLLM's own parser (``AsyncEngineArgs.add_cli_args``) reads them: so a graph
config takes exactly the flags of the installed vLLM, with vLLM's validation and defaults.
Keys vLLM does not know are servegrid's (``engine``, ``remote-prefill``, ...) and stay here.

Then servegrid adds what it always needs: KV cache events published over ZMQ to this worker
(``KVEventsConfig``), and, for disaggregated serving, a KV connector (``KVTransferConfig``,
NixlConnector unless ``kv-connector`` or vLLM's own ``kv-transfer-config`` names another).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from servegrid.distributed import env
from servegrid.engines.base import EngineConfigError
from servegrid.engines.vllm.api import VllmApi

DEFAULT_KV_CONNECTOR = "NixlConnector"
KV_EVENTS_TOPIC = "kv-events"
# Keys servegrid reads itself; never handed to vLLM's parser.
OWN_KEYS = frozenset({"engine", "model", "kv-connector", "lora-adapters"})


@dataclass
class EngineArgsPlan:
    """What ``build_engine_args`` made, for the engine and for tests to inspect."""

    argv: list[str]
    engine_args: Any
    ignored_keys: list[str] = field(default_factory=list)
    kv_connector: str | None = None


def config_to_argv(
    settings: Mapping[str, Any], known: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """``(argv, ignored keys)``: the settings vLLM's parser knows, as its flags.

    ``known`` maps option strings (``--enforce-eager``) to the parser's actions: a flag
    that takes no value gets no value; ``False`` becomes ``--no-KEY`` where vLLM declares
    one (its boolean-optional flags) and is left out for plain flags (off by default);
    lists and mappings are passed as JSON, as vLLM's JSON-valued flags expect.
    """
    argv: list[str] = []
    ignored: list[str] = []
    for key, value in settings.items():
        if key in OWN_KEYS or value is None:
            continue
        option = f"--{key}"
        action = known.get(option)
        if action is None:
            ignored.append(key)
            continue
        is_flag = getattr(action, "nargs", None) == 0
        if value is True:
            argv.append(option if is_flag else f"{option}=true")
        elif value is False:
            if f"--no-{key}" in known:
                argv.append(f"--no-{key}")
            elif not is_flag:
                argv.append(f"{option}=false")
        elif isinstance(value, (list, dict)):
            argv.append(f"{option}={json.dumps(value)}")
        else:
            argv.append(f"{option}={value}")
    return argv, ignored


def build_engine_args(
    api: VllmApi,
    settings: Mapping[str, Any],
    model: str,
    *,
    kv_events_endpoint: str,
    disaggregated: bool,
) -> EngineArgsPlan:
    """vLLM engine args for a service config (dashed keys) and a model path or hub id."""
    parser = api.AsyncEngineArgs.add_cli_args(api.FlexibleArgumentParser())
    known = dict(parser._option_string_actions)  # argparse's table of declared options
    argv, ignored = config_to_argv(settings, known)
    argv = ["--model", model, *argv]
    if settings.get("lora-adapters") and "enable-lora" not in settings and "--enable-lora" in known:
        argv.append("--enable-lora")  # adapters named in the config need LoRA support on
    _check_parallelism(settings)
    try:
        namespace = parser.parse_args(argv)
    except SystemExit:
        # argparse printed the reason (which flag, which value) to stderr already.
        raise EngineConfigError(
            f"vllm: the engine arguments {' '.join(argv)} were refused (see the line above)"
        ) from None
    engine_args = api.AsyncEngineArgs.from_cli_args(namespace)

    if settings.get("kv-events-config") is None:
        # The adapter's subscriber binds this loopback address; vLLM's publisher connects to
        # an explicit host (it binds only wildcard addresses), so nothing leaves the host.
        engine_args.kv_events_config = api.KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=kv_events_endpoint,
            topic=KV_EVENTS_TOPIC,
        )
    connector = None
    if settings.get("kv-transfer-config") is not None:
        connector = getattr(engine_args.kv_transfer_config, "kv_connector", None) or "custom"
    elif disaggregated or settings.get("kv-connector"):
        connector = str(settings.get("kv-connector") or DEFAULT_KV_CONNECTOR)
        # kv_both: the same settings serve a prefill worker (producer) and a decode worker
        # (consumer); which one a request is decides its kv_transfer_params.
        engine_args.kv_transfer_config = api.KVTransferConfig(
            kv_connector=connector, kv_role="kv_both"
        )
    return EngineArgsPlan(argv, engine_args, ignored, connector)


def _check_parallelism(settings: Mapping[str, Any]) -> None:
    """Tensor parallelism wider than this process's GPUs needs Ray (the ray_cluster role)."""
    try:
        tp = int(settings.get("tensor-parallel-size") or 1)
        pp = int(settings.get("pipeline-parallel-size") or 1)
    except (TypeError, ValueError):
        return  # vLLM's parser names the bad value
    visible = os.environ.get(env.CUDA_VISIBLE_DEVICES)
    if visible is None or visible == "":
        return
    local = len([d for d in visible.split(",") if d.strip()])
    backend = settings.get("distributed-executor-backend")
    if tp * pp > local and backend != "ray":
        raise EngineConfigError(
            f"vllm: tensor-parallel-size {tp} x pipeline-parallel-size {pp} needs {tp * pp} GPUs "
            f"but this worker has {local} (CUDA_VISIBLE_DEVICES={visible}); to span nodes set "
            "distributed-executor-backend: ray and run the worker on a Ray cluster's head"
        )
