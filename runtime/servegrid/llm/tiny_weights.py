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


def _values(name: str, count: int) -> array:
    if name.endswith("norm.weight"):
        return array("f", [1.0]) * count  # RMSNorm scales start at one
    std = EMBED_STD if "embed_tokens" in name else LINEAR_STD
    scale = std * _SQRT3 / _INT16_SPAN
    raw = array("h", shake_256(_SEED + name.encode()).digest(2 * count))
    if sys.byteorder != "little":
        raw.byteswap()  # the digest's bytes are read as little-endian on every machine
    return array("f", [v * scale for v in raw])


def write_weights(directory: Path, config: Mapping[str, Any]) -> int:
    """Write ``model.safetensors`` for ``config`` into ``directory``; return the parameters."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    tensors: list[array] = []
    offset = 0
    for name, shape in tensor_shapes(config):
        count = 1
        for dim in shape:
            count *= dim
        values = _values(name, count)
        if sys.byteorder != "little":
            values.byteswap()  # safetensors is little-endian
        tensors.append(values)
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + 4 * count],
        }
        offset += 4 * count
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(directory / WEIGHTS_FILE, "wb") as out:
        out.write(len(head).to_bytes(8, "little"))
        out.write(head)
        for values in tensors:
            values.tofile(out)
    return offset // 4
