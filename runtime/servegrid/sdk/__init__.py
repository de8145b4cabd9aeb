"""The servegrid service SDK: declare services, wire them into graphs, read config."""

from servegrid.sdk.config import ServiceConfig
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.dependency import depends
from servegrid.sdk.errors import ConfigError, GraphError, UserError
from servegrid.sdk.service import (
    async_on_drain,
    async_on_shutdown,
    async_on_start,
    endpoint,
    service,
)

__all__ = [
    "ConfigError",
    "GraphError",
    "ServiceConfig",
    "UserError",
    "async_on_drain",
    "async_on_shutdown",
    "async_on_start",
    "depends",
    "endpoint",
    "servegrid_context",
    "service",
]
