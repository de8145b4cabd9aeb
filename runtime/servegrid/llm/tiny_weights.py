"""Random weights for the tiny Llama model, written as safetensors with no torch or numpy.

``servegrid model init`` puts these beside the tokenizer so the torch engine can run a real
(if meaningless) transformer offline. Values come from SHAKE-256 of each tensor's name, so
every machine writes the same bytes, and the writer needs only the standard library: a
tokenizer-only install can still make a complete model directory.

The tensor names and shapes are those ``transformers``' ``LlamaForCausalLM`` loads; the
embedding is tied to the output layer, so there is no ``lm_head.weight``.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Iterator, Mapping
from hashlib import shake_256
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
_SEED = b"servegrid-tiny-llama-v1:"
_INT16_SPAN = 32768.0
# A uniform draw in [-a, a] has standard deviation a / sqrt(3).
_SQRT3 = 3.0**0.5
# Larger embeddings than a trained model's init make the (tied) logits spread widely, so
# greedy decoding of the random model is decisive: batch shape and float rounding never
# flip which token wins.
EMBED_STD = 0.1
LINEAR_STD = 0.05


def tensor_shapes(config: Mapping[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of a Llama ``config.json``, in file order."""
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    yield "model.embed_tokens.weight", (int(config["vocab_size"]), hidden)
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (heads * head_dim, hidden)
        yield p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)


def _uniform(name: str, count: int, std: float) -> array:
    scale = std * _SQRT3 / _INT16_SPAN
    raw = array("h", shake_256(_SEED + name.encode()).digest(2 * count))
    if sys.byteorder != "little":
        raw.byteswap()  # the digest's bytes are read as little-endian on every machine
    return array("f", [v * scale for v in raw])


def _values(name: str, count: int) -> array:
    if name.endswith("norm.weight"):
        return array("f", [1.0]) * count  # RMSNorm scales start at one
    return _uniform(name, count, EMBED_STD if "embed_tokens" in name else LINEAR_STD)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], array]]) -> int:
    """Write float32 ``(name, shape, values)`` tensors as one safetensors file; return values."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, values in tensors:
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + 4 * len(values)],
        }
        offset += 4 * len(values)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(head).to_bytes(8, "little"))
        out.write(head)
        for _, _, values in tensors:
            if sys.byteorder != "little":
                values = array("f", values)
                values.byteswap()  # safetensors is little-endian
            values.tofile(out)
    return offset // 4


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def write_weights(directory: Path, config: Mapping[str, Any]) -> int:
    """Write ``model.safetensors`` for ``config`` into ``directory``; return the parameters."""
    tensors = [(name, shape, _values(name, _count(shape))) for name, shape in tensor_shapes(config)]
    return write_safetensors(directory / WEIGHTS_FILE, tensors)


# A PEFT-format LoRA adapter for the tiny model: rank 8 on the attention projections. Its
# B matrices are random, not zero as in training's initialisation, so the adapter visibly
# changes what the model generates.
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_STD = 0.1
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"


def write_lora(directory: Path, config: Mapping[str, Any], name: str, base_model: str) -> int:
    """Write a LoRA adapter ``name`` for ``config`` into ``directory``; return its values."""
    shapes = dict(tensor_shapes(config))
    tensors: list[tuple[str, tuple[int, ...], array]] = []
    for i in range(int(config["num_hidden_layers"])):
        for target in LORA_TARGETS:
            out_features, in_features = shapes[f"model.layers.{i}.self_attn.{target}.weight"]
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            for part, shape in (
                ("lora_A", (LORA_RANK, in_features)),
                ("lora_B", (out_features, LORA_RANK)),
            ):
                key = f"{prefix}.{part}.weight"
                tensors.append((key, shape, _uniform(f"{name}:{key}", _count(shape), LORA_STD)))
    adapter_config = {
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": LORA_RANK,
        "target_modules": list(LORA_TARGETS),
        "task_type": "CAUSAL_LM",
    }
    (directory / LORA_CONFIG_FILE).write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return write_safetensors(directory / LORA_WEIGHTS_FILE, tensors)
