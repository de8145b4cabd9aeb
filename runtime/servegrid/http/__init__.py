"""The Frontend's OpenAI-compatible HTTP layer: server, routes, errors and metrics."""

from servegrid.http.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NoWorkersError,
    OpenAIHttpError,
)
from servegrid.http.metrics import FrontendMetrics
from servegrid.http.openai_app import OpenAIBackend
from servegrid.http.server import OpenAIHttpServer

__all__ = [
    "FrontendMetrics",
    "InvalidRequestError",
    "ModelNotFoundError",
    "NoWorkersError",
    "OpenAIBackend",
    "OpenAIHttpError",
    "OpenAIHttpServer",
]
