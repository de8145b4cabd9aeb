"""Client-visible errors across process boundaries.

A component raises the HTTP layer's error classes; when the raise happens in another process
it arrives as a ``RemoteError`` whose code is the class name. ``as_client_error`` turns it
back into the class, so the frontend answers the same status whether services share a
process or not.
"""

from __future__ import annotations

from servegrid.distributed.errors import NoInstancesError, RemoteError
from servegrid.engines.base import EngineRequestError, PromptTooLongError
from servegrid.http.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    NoWorkersError,
    OpenAIHttpError,
)

_BY_CODE: dict[str, type[OpenAIHttpError]] = {
    "InvalidRequestError": InvalidRequestError,
    "PromptTooLongError": ContextLengthExceededError,
    "ContextLengthExceededError": ContextLengthExceededError,
    "context_length_exceeded": ContextLengthExceededError,
    "EngineRequestError": InvalidRequestError,
    "ModelNotFoundError": ModelNotFoundError,
    "model_not_found": ModelNotFoundError,
    "NoWorkersError": NoWorkersError,
    "no_workers": NoWorkersError,
    "NoInstancesError": NoWorkersError,
}


def as_client_error(exc: BaseException) -> BaseException:
    """The error the HTTP layer should see for ``exc`` (``exc`` itself if none fits)."""
    if isinstance(exc, OpenAIHttpError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ContextLengthExceededError(str(exc))
    if isinstance(exc, EngineRequestError):
        return InvalidRequestError(str(exc))
    if isinstance(exc, NoInstancesError):
        return NoWorkersError(f"no worker is available right now ({exc})")
    if isinstance(exc, RemoteError):
        cls = _BY_CODE.get(exc.code)
        if cls is not None:
            message = exc.message
            # a remote message carries the remote str(exc); keep only the text
            return cls(message)
    return exc
