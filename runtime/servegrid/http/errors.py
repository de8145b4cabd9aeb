"""Errors the OpenAI HTTP layer turns into responses, and the OpenAI-style error body.

The Frontend's backend raises these; the server maps each class to one HTTP status. Any other
exception becomes a 500 whose message reveals nothing internal (the traceback goes to the log).
"""

from __future__ import annotations

import msgspec

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


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context window."""

    code = "context_length_exceeded"


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
