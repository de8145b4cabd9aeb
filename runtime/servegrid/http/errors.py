"""Errors the OpenAI HTTP layer turns into responses, and the OpenAI-style error body.

Each class has one HTTP status. The serving path raises domain errors (``servegrid.errors``),
which know nothing of HTTP; ``http_error_for`` is the one place that maps them to these. Any
other exception becomes a 500 whose message reveals nothing internal (the traceback goes to
the log).
"""

from __future__ import annotations

import msgspec

from servegrid import errors as domain
from servegrid.distributed.errors import NoInstancesError

_encode = msgspec.json.Encoder().encode


class OpenAIHttpError(Exception):
    """Base: an error with an HTTP status and an OpenAI error ``type``/``code``."""

    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequestError(OpenAIHttpError):
    """The request is well-formed but cannot be served as asked (e.g. prompt too long)."""

    status = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(OpenAIHttpError):
    """No worker serves the requested model."""

    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, message: str, param: str | None = "model") -> None:
        super().__init__(message, param)


class NoWorkersError(OpenAIHttpError):
    """The model is known but no worker is available to serve it right now."""

    status = 503
    error_type = "service_unavailable_error"
    code = "no_workers"


class RequestTooLargeError(OpenAIHttpError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeoutError(OpenAIHttpError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class UrlTooLongError(OpenAIHttpError):
    status = 414
    error_type = "invalid_request_error"
    code = "url_too_long"


class HeadersTooLargeError(OpenAIHttpError):
    status = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class TooManyConnectionsError(OpenAIHttpError):
    status = 503
    error_type = "service_unavailable_error"
    code = "too_many_connections"


class RouteNotFoundError(OpenAIHttpError):
    status = 404
    error_type = "not_found_error"
    code = "route_not_found"


class MethodNotAllowedError(OpenAIHttpError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


INTERNAL_ERROR_MESSAGE = (
    "The server hit an internal error while handling this request; it has been logged. "
    "Retry, and report it if it persists."
)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> bytes:
    """The JSON body OpenAI clients parse: ``{"error": {message, type, param, code}}``."""
    return _encode(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class WorkerLostError(NoWorkersError):
    code = "worker_lost"


# Most specific first: the first class that matches decides.
_HTTP_FOR_DOMAIN: list[tuple[type[domain.ServegridError], type[OpenAIHttpError]]] = [
    (domain.ContextLengthExceededError, ContextLengthExceededError),
    (domain.InvalidRequestError, InvalidRequestError),
    (domain.ModelNotFoundError, ModelNotFoundError),
    (domain.WorkerLostError, WorkerLostError),
    (domain.NoWorkersError, NoWorkersError),
]


def http_error_for(exc: BaseException) -> OpenAIHttpError | None:
    """The HTTP error to answer for ``exc``, or None if it is not a client-visible error."""
    if isinstance(exc, OpenAIHttpError):
        return exc
    if isinstance(exc, domain.ServegridError):
        for domain_cls, http_cls in _HTTP_FOR_DOMAIN:
            if isinstance(exc, domain_cls):
                return http_cls(exc.message, exc.param)
        return None
    if isinstance(exc, NoInstancesError):
        return NoWorkersError(f"no worker is available right now ({exc})")
    return None
