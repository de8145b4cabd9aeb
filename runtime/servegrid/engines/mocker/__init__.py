"""The mocker engine: a simulated vLLM-like scheduler with a real prefix cache, no weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from servegrid.engines.mocker.config import MockerConfig
from servegrid.engines.mocker.engine import EngineDeadError, MockerEngine
from servegrid.engines.mocker.kv_transfer import KvTransferMocker

DEFAULT_VOCAB_SIZE = 2048

__all__ = ["EngineDeadError", "KvTransferMocker", "MockerConfig", "MockerEngine", "create"]


def _readable(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and text.replace("\n", " ").isprintable()


def create(config: Mapping[str, Any]) -> KvTransferMocker:
    """Build a mocker from a service config (dashed keys; keys of other parts are ignored).

    With a ``model`` the vocabulary and special ids come from that model's tokenizer, so
    the processor can detokenize what the mocker makes; ``vocab-size`` overrides the size.
    """
    cfg = MockerConfig.from_config(config)
    vocab_size = DEFAULT_VOCAB_SIZE
    special: frozenset[int] = frozenset()
    if cfg.model:
        from servegrid.llm.model_init import ensure_model
        from servegrid.llm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(ensure_model(cfg.model))
        vocab_size = tokenizer.vocab_size
        # Leave out special ids, byte-level pieces of a split character (they decode to
        # U+FFFD alone) and control characters, so made-up text reads as words.
        unreadable = {i for i in range(vocab_size) if not _readable(tokenizer.decode([i]))}
        special = tokenizer.special_ids | unreadable
    if cfg.vocab_size is not None:
        vocab_size = cfg.vocab_size
    return KvTransferMocker(cfg, vocab_size=vocab_size, special_ids=special)
