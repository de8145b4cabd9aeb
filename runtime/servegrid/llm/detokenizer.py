"""Incremental detokenization and stop strings: the token-streaming hot path.

Each ``feed`` decodes only a short window of recent ids: a few already-emitted *context*
ids (so tokenizers whose decoding depends on the previous token, such as SentencePiece's
leading-space rule, render the new ones correctly) followed by the ids not yet emitted.
The work is done by ``tokenizers``' own ``DecodeStream`` (Rust, 1 to 2 µs a token)
where the installed version has it, else by a Python window over ``decode`` (about 4 µs).

A decode that ends in U+FFFD usually means a multi-byte character split across tokens;
its text is held back until the rest of the character arrives (or ``flush`` at the end).
Stop strings are cut out of the stream: text before the first match is emitted, the match
and everything after are dropped, and text that could still become a match is held back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

_REPLACEMENT = "\ufffd"
_CONTEXT = 4  # emitted ids kept in the window for the next tokens' context
_REBASE_AT = 24  # window length that triggers a re-base (one extra decode)
# A character spans at most 4 byte tokens: a tail still incomplete after this many feeds
# without progress is invalid bytes, not a split character, and is emitted as U+FFFD.
_MAX_DIRTY_FEEDS = 4


class _RustStream:
    """``DecodeStream`` plus the ids it holds back, so the tail can be flushed."""

    __slots__ = ("_held", "_hf", "_skip", "_stream")

    def __init__(self, hf: Any, context: list[int], skip: bool) -> None:
        self._hf = hf
        self._skip = skip
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=skip)
        self._held: list[int] = []

    def step(self, ids: Sequence[int]) -> str:
        # The int form is about twice as fast as the list form, and one id is the usual case.
        chunk = self._stream.step(self._hf, ids[0] if len(ids) == 1 else list(ids))
        if chunk is None:
            self._held.extend(ids)
            return ""
        if self._held:
            self._held.clear()
        return chunk

    def flush(self) -> str:
        if not self._held:
            return ""
        text = self._hf.decode(self._held, skip_special_tokens=self._skip)
        self._held.clear()
        return text


class _PyStream:
    """The same contract in Python, for ``tokenizers`` without ``DecodeStream``."""

    __slots__ = ("_ctx_len", "_decode", "_dirty", "_emitted", "_pending", "_skip", "_window")

    def __init__(self, hf: Any, context: list[int], skip: bool) -> None:
        self._decode = hf.decode
        self._skip = skip
        self._window = context
        self._ctx_len = len(self._decode(context, skip_special_tokens=skip))
        self._emitted = 0  # chars emitted past the context text
        self._pending = 0  # ids in the window not yet turned into emitted text
        self._dirty = 0  # feeds in a row that ended inside a character and emitted nothing

    def step(self, ids: Sequence[int]) -> str:
        window = self._window
        window.extend(ids)
        self._pending += len(ids)
        text = self._decode(window, skip_special_tokens=self._skip)
        start = self._ctx_len + self._emitted
        end = len(text)
        if text.endswith(_REPLACEMENT):
            self._dirty += 1
            if self._dirty < _MAX_DIRTY_FEEDS:
                # Emit what precedes the incomplete character; its bytes may complete later.
                end = len(text.rstrip(_REPLACEMENT))
        if end <= start:
            return ""
        delta = text[start:end]
        self._dirty = 0
        if end < len(text):
            self._emitted += len(delta)
            return delta
        self._pending = 0
        if len(window) >= _REBASE_AT:
            del window[:-_CONTEXT]
            self._ctx_len = len(self._decode(window, skip_special_tokens=self._skip))
            self._emitted = 0
        else:
            self._emitted += len(delta)
        return delta

    def flush(self) -> str:
        if not self._pending:
            return ""
        text = self._decode(self._window, skip_special_tokens=self._skip)
        delta = text[self._ctx_len + self._emitted :]
        self._pending = 0
        self._emitted += len(delta)
        return delta


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas for one sequence."""

    __slots__ = ("_held", "_step", "_stops", "_stream", "stop_matched", "stopped")

    def __init__(
        self,
        tokenizer: Any,
        *,
        prompt_ids: Sequence[int] | None = None,
        stop: Iterable[str] | None = None,
        skip_special_tokens: bool = True,
        use_rust: bool = True,
    ) -> None:
        # Accept our Tokenizer wrapper or a bare ``tokenizers.Tokenizer``.
        hf = getattr(tokenizer, "hf", tokenizer)
        context = list(prompt_ids[-_CONTEXT:]) if prompt_ids else []
        impl = _RustStream if use_rust and DecodeStream is not None else _PyStream
        self._stream = impl(hf, context, skip_special_tokens)
        self._step = self._stream.step
        self._stops = tuple(s for s in (stop or ()) if s)
        self._held = ""  # text that may be the start of a stop string
        self.stopped = False  # a stop string matched; later feeds return ""
        self.stop_matched: str | None = None

    def feed(self, token_ids: Sequence[int]) -> str:
        """Add newly generated ids; return the text they complete (may be empty)."""
        if self.stopped:
            return ""
        delta = self._step(token_ids)
        return self._filter(delta) if self._stops else delta

    def flush(self) -> str:
        """Text still held back, at the end of the sequence (incomplete bytes included)."""
        if self.stopped:
            return ""
        delta = self._stream.flush()
        if self._stops:
            delta = self._filter(delta)
            delta, self._held = delta + self._held, ""
        return delta

    def _filter(self, delta: str) -> str:
        buf = self._held + delta if self._held else delta
        if not buf:
            return ""
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, self.stop_matched = i, s
        if cut != -1:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        # Hold back the longest tail that is a proper prefix of some stop string.
        keep = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep]
        self._held = ""
        return buf
