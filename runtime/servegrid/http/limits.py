"""The frontend's HTTP limits: what one client may hold or send, and for how long.

Each field is a ``Frontend`` config key of the same name in kebab case (``max-connections``,
``header-timeout-s``...); the defaults here are the only place they are defined. They bound
what a slow or hostile client can take: file descriptors (``max-connections``), memory
(``max-url-bytes``, ``max-header-bytes``, ``max-body-bytes``) and time (the timeouts).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

KiB = 1024
MiB = 1024 * KiB


class HttpLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_connections: Annotated[int, Field(ge=1)] = 2048
    """Open client connections. At the cap a new connection closes the longest-idle one (no
    request under way) to take its place; when every connection is busy it is answered 503 and
    closed at once."""

    keepalive_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    """An idle connection (no request under way, including a new one) is closed after this."""

    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """From a request's first byte to the end of its headers; then 408 and close."""

    body_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """From the end of the headers to the end of the body; then 408 and close."""

    write_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """A client that does not read its response: from when writing to it stalls (its socket
    and our buffer are full) until it reads again. Past this the connection is closed and the
    request cancelled, so the worker frees its sequence."""

    max_url_bytes: Annotated[int, Field(ge=64)] = 8 * KiB
    """Request target (path and query); longer is 414."""

    max_header_bytes: Annotated[int, Field(ge=256)] = 32 * KiB
    """Request line and header fields together; more is 431."""

    max_headers: Annotated[int, Field(ge=8)] = 100
    """Header fields in one request; more is 431."""

    max_body_bytes: Annotated[int, Field(ge=1)] = 8 * MiB
    """Request body; larger is 413 (declared sizes are refused before the body is read). A
    prompt's length in tokens is bounded later by the Processor's ``max-model-len``."""


DEFAULT_LIMITS = HttpLimits()
