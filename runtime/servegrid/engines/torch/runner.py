"""The torch engine's model side: load a Hugging Face causal LM and run scheduled batches.

Everything here runs on the engine's compute thread, never on the event loop. A step is a
list of batches; a batch is a few sequences that each bring some new tokens (one for a
decoding sequence, a chunk of prompt for a prefilling one) and the KV of the tokens before
them, which lives in the paged cache (``kv_cache.PagedKvCache``).

One forward pass of a batch goes through the model's own ``forward`` (any architecture
``transformers`` supports with a ``DynamicCache`` and explicit ``position_ids``): the rows'
past keys and values are gathered from their blocks into one left-padded ``DynamicCache``,
the new tokens are right-padded, a 2-D attention mask hides both paddings, and positions
are each row's own. Afterwards the new tokens' keys and values are copied from the
``DynamicCache`` back into the rows' blocks, and the logits of each row's last new token
are sampled. Keys are cached after the rotary embedding, as ``transformers`` caches them, so
a block's content does not depend on the batch it was computed in.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from servegrid.engines.base import EngineConfigError
from servegrid.engines.torch.kv_cache import PagedKvCache
from servegrid.engines.torch.sampling import sample

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class BatchRow:
    """One sequence's share of a forward pass (built on the event loop, read-only here)."""

    token_ids: list[int]  # the new tokens, at positions start .. start + len - 1
    start: int  # tokens whose KV is in the cache already
    block_ids: list[int]  # the sequence's blocks, covering at least start + len tokens
    sample: bool  # the last new token is the sequence's last: pick the next one
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    adapter: str | None = None  # a LoRA adapter's name; every row of a batch shares it


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EngineConfigError(f"torch: device {name!r} is not a torch device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError(
            f"torch: device {name!r} asked for, but this torch build or host has no CUDA; "
            "use device: cpu"
        )
    return device


def resolve_dtype(name: str, device: torch.device, model_config: Any) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU kernels for half types are slow or missing
    configured = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(configured, torch.dtype) and configured in _DTYPES.values():
        return configured
    if isinstance(configured, str) and configured in _DTYPES:
        return _DTYPES[configured]
    return torch.bfloat16


def model_shape(config: Any, where: Path) -> ModelShape:
    """What the KV cache needs to know of a ``transformers`` config (llama-style names)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        shape = ModelShape(
            num_layers=int(text.num_hidden_layers),
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            vocab_size=int(text.vocab_size),
            max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise EngineConfigError(
            f"torch: cannot size a KV cache from {where}/config.json ({exc}); it needs "
            "num_hidden_layers, num_attention_heads, hidden_size or head_dim, vocab_size"
        ) from None
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        raise EngineConfigError(
            f"torch: {where} uses sliding-window attention, which the torch engine's paged "
            "cache does not implement; serve it with engine: vllm"
        )
    return shape


class ModelRunner:
    """Owns the model and the KV tensors; ``run`` executes one scheduler step."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str,
        dtype: str,
        num_threads: int,
    ) -> None:
        self.model_dir = model_dir
        self._device_name = device
        self._dtype_name = dtype
        self._num_threads = num_threads
        self.model: Any = None
        # LoRA adapters, merged into their own copy of the weights (see add_lora).
        self.adapters: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.shape: ModelShape | None = None
        self.cache: PagedKvCache | None = None

    def load(self) -> ModelShape:
        """Load config and weights (slow: call it off the event loop)."""
        # Imported here: transformers takes seconds to import, and only this engine needs it.
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a progress bar per load would fill the service log
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.shape = model_shape(config, self.model_dir)
        self.device = resolve_device(self._device_name)
        self.dtype = resolve_dtype(self._dtype_name, self.device, config)
        weights = [p for p in os.listdir(self.model_dir) if p.endswith((".safetensors", ".bin"))]
        if not weights:
            raise EngineConfigError(
                f"torch: {self.model_dir} has no weights (*.safetensors); "
                f"`servegrid model init --force {self.model_dir}` writes a tiny random model"
            )
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype, attn_implementation="sdpa"
        )
        self.model = model.to(self.device).eval()
        log.info(
            "torch engine: %s on %s (%s), %d layers, %d KV heads of %d",
            self.model_dir,
            self.device,
            self.dtype,
            self.shape.num_layers,
            self.shape.num_kv_heads,
            self.shape.head_dim,
        )
        return self.shape

    def add_lora(self, name: str, where: str) -> None:
        """Load a PEFT LoRA adapter and merge it into a copy of the model (slow: off-loop).

        Merging (W + alpha/r * B @ A on each target projection) keeps the forward pass the
        model's own, at the cost of one copy of the weights per adapter: right for the small
        models this engine serves; vLLM applies adapters batched on the GPU instead.
        """
        import copy

        from safetensors.torch import load_file

        path = Path(where).expanduser()
        config_path = path / "adapter_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            weights = load_file(str(path / "adapter_model.safetensors"))
        except (OSError, ValueError) as exc:
            raise EngineConfigError(
                f"torch: LoRA adapter {name!r} at {path}: {exc}; it must be a PEFT directory "
                "(adapter_config.json, adapter_model.safetensors)"
            ) from None
        if config.get("peft_type", "LORA") != "LORA" or not config.get("r"):
            raise EngineConfigError(f"torch: {config_path} is not a LoRA adapter config")
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        merged = copy.deepcopy(self.model)
        count = 0
        with torch.inference_mode():
            for key, a in weights.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                module_path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = weights.get(key.replace(".lora_A.", ".lora_B."))
                try:
                    module = merged.get_submodule(module_path)
                except AttributeError:
                    module = None
                if b is None or module is None or not hasattr(module, "weight"):
                    raise EngineConfigError(
                        f"torch: LoRA adapter {name!r}: {key} does not match a layer of "
                        f"{self.model_dir} (is it an adapter for this model?)"
                    )
                delta = (b.float() @ a.float()) * scale
                if delta.shape != module.weight.shape:
                    raise EngineConfigError(
                        f"torch: LoRA adapter {name!r}: {module_path} is {tuple(delta.shape)} "
                        f"in the adapter, {tuple(module.weight.shape)} in the model"
                    )
                module.weight += delta.to(module.weight.dtype).to(module.weight.device)
                count += 1
        if not count:
            raise EngineConfigError(f"torch: LoRA adapter {name!r} at {path} has no LoRA weights")
        self.adapters[name] = merged.eval()
        log.info(
            "torch engine: LoRA adapter %s (%d layers, rank %d) from %s", name, count, rank, path
        )

    def allocate_cache(self, num_blocks: int, block_size: int) -> PagedKvCache:
        assert self.shape is not None
        self.cache = PagedKvCache(
            num_blocks=num_blocks,
            block_size=block_size,
            num_layers=self.shape.num_layers,
            num_kv_heads=self.shape.num_kv_heads,
            head_dim=self.shape.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        return self.cache

    def run(self, batches: list[list[BatchRow]]) -> list[list[int | None]]:
        """Run each batch; per batch, per row, the sampled token id (None: no sample)."""
        with torch.inference_mode():
            return [self._forward(rows) for rows in batches]

    def _forward(self, rows: list[BatchRow]) -> list[int | None]:
        from transformers import DynamicCache

        cache = self.cache
        assert cache is not None
        device = self.device
        bs = cache.block_size
        n_rows = len(rows)
        past = max(r.start for r in rows)
        width = max(len(r.token_ids) for r in rows)

        # Past KV: row i's tokens 0..start-1 sit at columns past-start .. past-1.
        past_block = torch.zeros((n_rows, past), dtype=torch.long)
        past_offset = torch.zeros((n_rows, past), dtype=torch.long)
        mask = torch.zeros((n_rows, past + width), dtype=torch.long)
        input_ids = torch.zeros((n_rows, width), dtype=torch.long)
        positions = torch.zeros((n_rows, width), dtype=torch.long)
        new_block: list[int] = []
        new_offset: list[int] = []
        new_row: list[int] = []
        new_col: list[int] = []
        for i, row in enumerate(rows):
            start, n = row.start, len(row.token_ids)
            if start:
                pos = torch.arange(start)
                ids = torch.tensor(row.block_ids[: (start + bs - 1) // bs], dtype=torch.long)
                past_block[i, past - start :] = ids[pos // bs]
                past_offset[i, past - start :] = pos % bs
                mask[i, past - start : past] = 1
            mask[i, past : past + n] = 1
            input_ids[i, :n] = torch.tensor(row.token_ids, dtype=torch.long)
            positions[i] = torch.arange(start, start + width)
            for j in range(n):
                p = start + j
                new_block.append(row.block_ids[p // bs])
                new_offset.append(p % bs)
                new_row.append(i)
                new_col.append(j)

        kv = DynamicCache(config=self.model.config)
        if past:
            pb, po = past_block.to(device), past_offset.to(device)
            for layer in range(cache.num_layers):
                keys, values = cache.gather(layer, pb, po)  # [B, P, H, D]
                kv.update(keys.transpose(1, 2), values.transpose(1, 2), layer)
        # Only the rows' last new tokens need logits: a long prompt's full logits would not fit.
        last = sorted({len(r.token_ids) - 1 for r in rows})
        model = self.model if rows[0].adapter is None else self.adapters[rows[0].adapter]
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=None if n_rows == 1 else mask.to(device),
            position_ids=positions.to(device),
            past_key_values=kv,
            use_cache=True,
            logits_to_keep=torch.tensor(last, dtype=torch.long, device=device),
        )
        nb = torch.tensor(new_block, dtype=torch.long, device=device)
        no = torch.tensor(new_offset, dtype=torch.long, device=device)
        nr = torch.tensor(new_row, dtype=torch.long, device=device)
        nc = torch.tensor(new_col, dtype=torch.long, device=device)
        for layer in range(cache.num_layers):
            layer_cache = kv.layers[layer]
            keys = layer_cache.keys[:, :, -width:].transpose(1, 2)  # [B, T, H, D]
            values = layer_cache.values[:, :, -width:].transpose(1, 2)
            cache.scatter(layer, nb, no, keys[nr, nc], values[nr, nc])

        logits = out.logits  # [B, len(last), vocab]
        column = {c: k for k, c in enumerate(last)}
        sampled: list[int | None] = []
        for i, row in enumerate(rows):
            if not row.sample:
                sampled.append(None)
                continue
            row_logits = logits[i, column[len(row.token_ids) - 1]]
            assert row.generator is not None
            sampled.append(sample(row_logits, row.temperature, row.top_p, row.generator))
        return sampled
