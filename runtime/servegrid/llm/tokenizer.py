"""A model directory's tokenizer and chat template, as the processor uses them.

Works with any local Hugging Face directory holding ``tokenizer.json`` and
``tokenizer_config.json`` (the built-in tiny model or a real one). The chat template is
rendered the way ``transformers`` does it: a sandboxed Jinja2 environment with
``trim_blocks``/``lstrip_blocks``, a ``raise_exception`` helper, ``tojson``, and the
``bos_token``/``eos_token`` variables, so existing model templates render unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HfTokenizer


class ChatTemplateError(Exception):
    """A chat template is missing, broken, or rejected the messages (a client error)."""


def _token_text(value: Any) -> str | None:
    # tokenizer_config may hold a token as a plain string or as an AddedToken dict.
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=32)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Encode, decode and chat-format text for one model directory."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.hf = _HfTokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        config = _read_json(self.model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._chat_template = _select_template(config, self.model_dir)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            i for i, tok in self.hf.get_added_tokens_decoder().items() if tok.special
        )
        self.eos_token_ids = frozenset(self._eos_ids())

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        if self.eos_token is not None:
            tid = self.hf.token_to_id(self.eos_token)
            if tid is not None:
                ids.append(tid)
        gen = self.model_dir / "generation_config.json"
        if gen.is_file():
            value = _read_json(gen).get("eos_token_id")
            ids.extend(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    def encode(
        self, text: str, *, add_special_tokens: bool = False, release_gil: bool = False
    ) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their own ids.

        ``release_gil``: for a call on a worker thread. ``encode`` holds the GIL for the
        whole call (a 5 MB text stalls every other thread for seconds); the batch call
        releases it, at the cost of a little overhead that matters only for short texts.
        """
        if release_gil:
            return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: its longest vocabulary entry.

        Byte-level BPE entries have one character per byte and byte-fallback entries are
        longer than the byte they stand for, so a text of N tokens has at most
        ``N * max_token_chars`` characters: a bound checked before paying for tokenization.
        """
        return max(len(token) for token in self.hf.get_vocab(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) into the prompt text.

        ``extra`` reaches the template as variables (``tools``, ``documents``...).
        """
        if self._chat_template is None:
            raise ChatTemplateError(
                f"model {self.model_dir} has no chat_template in tokenizer_config.json; "
                "use the completions endpoint or a chat model"
            )
        try:
            template = _compile(self._chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template of {self.model_dir} failed: {exc}") from exc

    def apply_chat_template_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        release_gil: bool = False,
    ) -> list[int]:
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
            release_gil=release_gil,
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _select_template(config: Mapping[str, Any], model_dir: Path) -> str | None:
    # Newer HF checkpoints keep the template in its own file.
    standalone = model_dir / "chat_template.jinja"
    if standalone.is_file():
        return standalone.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        return named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


@lru_cache(maxsize=8)
def _load_cached(model_dir: str) -> Tokenizer:
    return Tokenizer(Path(model_dir))


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The (cached, per process) tokenizer of a model directory."""
    return _load_cached(str(Path(model_dir).resolve()))
