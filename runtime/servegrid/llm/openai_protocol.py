"""The OpenAI API at the HTTP edge: request models (pydantic, validated once) and response bytes.

Requests are validated here and converted to the internal ``TextRequest``; nothing behind the
frontend sees pydantic. Responses are built as plain dicts, or for stream chunks as bytes around
a per-request precomputed prefix, and encoded with msgspec: no pydantic on the hot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from servegrid.llm.protocol import TextRequest

_encode = msgspec.json.Encoder().encode

# The only content part kind we can feed to a text model.
_TEXT_PART = "text"
_ROLES = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Lenient(BaseModel):
    # Clients send many fields we do not use (tools, logit_bias, metadata...): ignore them.
    model_config = ConfigDict(extra="ignore", frozen=False)


class ChatMessage(_Lenient):
    role: _ROLES
    content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _flatten_content(cls, value: Any) -> Any:
        """Accept a string, null, or a list of ``{"type": "text", "text": ...}`` parts."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for i, part in enumerate(value):
                if not isinstance(part, dict):
                    raise ValueError(f"content part {i} must be an object, got {_kind(part)}")
                kind = part.get("type")
                if kind != _TEXT_PART:
                    raise ValueError(
                        f"content part {i} has type {kind!r}; only 'text' parts are supported"
                    )
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"content part {i} needs a string 'text'")
                texts.append(text)
            return "\n".join(texts)
        raise ValueError(f"must be a string or a list of text parts, got {_kind(value)}")


class StreamOptions(_Lenient):
    include_usage: bool = False


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError(f"must be a string or a list of strings, got {_kind(value)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


class _SamplingFields(_Lenient):
    """Fields both endpoints share."""

    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: list[str] = []
    # Engines take a signed 64-bit seed (vLLM's bound too); larger cannot cross the wire.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (vLLM-style): generate exactly max_tokens

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return _stop_list(value)

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def to_text_request(self, request_id: str) -> TextRequest:
        messages = []
        for m in self.messages:
            entry = {"role": m.role, "content": m.content or ""}
            if m.name is not None:
                entry["name"] = m.name
            messages.append(entry)
        return TextRequest(
            request_id=request_id,
            model=self.model,
            kind="chat",
            messages=messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    prompt: str
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # the OpenAI default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str):
                return value[0]
            if value and all(isinstance(p, str) for p in value):
                raise ValueError(f"only one prompt per request is supported, got {len(value)}")
            raise ValueError("must be a string or a list of one string (token ids unsupported)")
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_kind(value)}")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only best_of=1 is supported, got {value}")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    def to_text_request(self, request_id: str) -> TextRequest:
        # echo is applied by the HTTP layer (it holds the prompt text); the backend only generates.
        return TextRequest(
            request_id=request_id,
            model=self.model,
            kind="completion",
            prompt=self.prompt,
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
        )


def describe_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    """A readable message naming the offending field(s), and the first field as ``param``."""
    parts = []
    first_param = None
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        kind = err["type"]
        if kind == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            return f"Request body is not valid JSON ({ctx}).", None
        if kind == "model_type" and not loc:
            return "Request body must be a JSON object.", None
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if kind == "missing":
            msg = "field required"
        elif kind not in ("value_error",) and _short(err.get("input")):
            msg = f"{msg} (got {err['input']!r})"
        first_param = first_param or loc or None
        parts.append(f"'{loc}': {msg}" if loc else msg)
    more = len(exc.errors()) - len(parts)
    suffix = f" (and {more} more)" if more > 0 else ""
    return "Invalid request: " + "; ".join(parts) + suffix + ".", first_param


def _short(value: Any) -> bool:
    return isinstance(value, int | float | bool) or (isinstance(value, str) and len(value) <= 40)


# -- responses ------------------------------------------------------------------------------


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _completion_body(
    request_id: str, obj: str, model: str, created: int, choice: dict, usage: dict
) -> bytes:
    return _encode(
        {
            "id": request_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    )


def chat_completion(
    request_id: str, model: str, created: int, text: str, finish_reason: str, usage: dict
) -> bytes:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return _completion_body(request_id, "chat.completion", model, created, choice, usage)


def text_completion(
    request_id: str, model: str, created: int, text: str, finish_reason: str, usage: dict
) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _completion_body(request_id, "text_completion", model, created, choice, usage)


class StreamEncoder:
    """SSE events of one streamed response, built around a prefix computed once per request.

    Chat events are ``chat.completion.chunk`` objects whose first delta carries the role;
    completion events are ``text_completion`` objects. With ``include_usage`` every event has
    ``"usage": null`` and ``usage_event`` adds the final event with empty ``choices``.
    """

    __slots__ = ("_chat", "_head", "_prefix", "_usage_null", "first")

    def __init__(
        self, kind: str, request_id: str, model: str, created: int, include_usage: bool
    ) -> None:
        self._chat = kind == "chat"
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        head = _encode({"id": request_id, "object": obj, "created": created, "model": model})
        self._head = b"data: " + head[:-1]  # without the closing brace
        field = b'"delta":' if self._chat else b'"text":'
        self._prefix = self._head + b',"choices":[{"index":0,' + field
        self._usage_null = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self.first = True

    def event(self, text: str, finish_reason: str | None) -> bytes:
        if self._chat:
            if self.first:
                body = _encode({"role": "assistant", "content": text})
            elif text:
                body = _encode({"content": text})
            else:
                body = b"{}"
        else:
            body = _encode(text)
        self.first = False
        return b"".join(
            (
                self._prefix,
                body,
                b',"logprobs":null,"finish_reason":',
                _encode(finish_reason),
                b"}]",
                self._usage_null,
            )
        )

    def usage_event(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
        usage = _encode(usage_dict(prompt_tokens, completion_tokens, cached_tokens))
        return self._head + b',"choices":[],"usage":' + usage + b"}\n\n"


def sse_error_event(error_body: bytes) -> bytes:
    return b"data: " + error_body + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
