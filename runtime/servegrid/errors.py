"""Domain errors: what went wrong with a request, in terms of serving, not of HTTP.

Every layer may raise these (the Processor, the Router, engines, the Frontend); none of them
knows HTTP. Each class has a stable ``code`` that crosses process boundaries: the request
plane sends ``[code, message]`` for a failed stream and ``from_remote`` turns it back into the
same class on the caller's side. The HTTP edge (``servegrid.http.errors.http_error_for``) maps
them to statuses and OpenAI error bodies.
"""

from __future__ import annotations

from typing import ClassVar


class ServegridError(Exception):
    """Base of the client-visible domain errors; ``param`` names the offending request field."""

    code: ClassVar[str] = "servegrid_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(ServegridError, ValueError):
    """The request cannot be served as asked, whatever the load (a client error)."""

    code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the model's context (``max-model-len``)."""

    code = "context_length_exceeded"


class ModelNotFoundError(ServegridError):
    """No worker serves the requested model."""

    code = "model_not_found"

    def __init__(self, message: str, param: str | None = "model") -> None:
        super().__init__(message, param)


class NoWorkersError(ServegridError):
    """No worker can take the request right now (none registered, or all gone)."""

    code = "no_workers"


class WorkerLostError(NoWorkersError):
    """The worker of a running stream died and no other worker could continue it."""

    code = "worker_lost"


_BY_CODE: dict[str, type[ServegridError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        ContextLengthExceededError,
        ModelNotFoundError,
        NoWorkersError,
        WorkerLostError,
    )
}


def from_remote(code: str, message: str) -> ServegridError | None:
    """The domain error a remote stream ended with, or None if ``code`` is not one."""
    cls = _BY_CODE.get(code)
    return None if cls is None else cls(message)
