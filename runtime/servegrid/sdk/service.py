"""``@service``, ``@endpoint`` and the lifecycle hooks: how a class becomes a service.

The decorator leaves the class a plain class (it can be instantiated and unit-tested as is)
and attaches a ``ServiceSpec`` as ``cls.__servegrid__``, plus two class methods:
``link(other)`` to build graphs and ``address()`` for ``(namespace, name)``, the address
under which the running service's endpoints are registered:

    runtime = servegrid_context["runtime"]
    ns, name = Worker.address()
    client = await runtime.namespace(ns).component(name).endpoint("generate").client()
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

DEFAULT_NAMESPACE = "servegrid"
DEFAULT_DRAIN_TIMEOUT = 30.0

T = TypeVar("T", bound=type)


@dataclass(slots=True)
class EndpointSpec:
    name: str
    method_name: str
    streaming: bool
    request_type: Any  # the annotated type of the request parameter, or None
    response_type: Any  # the item type a caller decodes into, or None


@dataclass
class ServiceSpec:
    """Everything the SDK knows about a service class."""

    cls: type
    name: str
    namespace: str = DEFAULT_NAMESPACE
    namespace_explicit: bool = False  # named in @service(namespace=...), not the default
    resources: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, EndpointSpec] = field(default_factory=dict)
    on_start: list[str] = field(default_factory=list)
    on_shutdown: list[str] = field(default_factory=list)
    on_drain: list[str] = field(default_factory=list)
    # attribute name → Dependency; filled by Dependency.__set_name__
    dependencies: dict[str, Any] = field(default_factory=dict)

    def service_args(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "resources": dict(self.resources),
            "workers": self.workers,
            "drain-timeout": DEFAULT_DRAIN_TIMEOUT,
        }


def _endpoint_types(func: Callable) -> tuple[Any, Any]:
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolved forward references: fall back to raw payloads
        return None, None
    params = [p for p in inspect.signature(func).parameters if p != "self"]
    request_type = hints.get(params[0]) if params else None
    response_type = hints.get("return")
    origin = typing.get_origin(response_type)
    if origin in (AsyncIterator, typing.AsyncIterator, typing.AsyncGenerator) or (
        origin is not None
        and getattr(origin, "__name__", "") in ("AsyncIterator", "AsyncGenerator")
    ):
        args = typing.get_args(response_type)
        response_type = args[0] if args else None
    if request_type is Any:
        request_type = None
    if response_type is Any or response_type is type(None):
        response_type = None
    return request_type, response_type


def endpoint(name: str | Callable | None = None) -> Any:
    """Mark a method as an endpoint: ``@endpoint()``, ``@endpoint("name")`` or ``@endpoint``.

    An ``async def`` endpoint answers once; an async generator streams its yields.
    """

    def mark(func: Callable) -> Callable:
        endpoint_name = name if isinstance(name, str) else func.__name__
        func.__servegrid_endpoint__ = endpoint_name  # type: ignore[attr-defined]
        return func

    if callable(name):
        return mark(name)
    return mark


def async_on_start(func: Callable) -> Callable:
    """Run ``await self.func()`` after construction, before the service takes requests."""
    func.__servegrid_on_start__ = True  # type: ignore[attr-defined]
    return func


def async_on_shutdown(func: Callable) -> Callable:
    """Run ``await self.func()`` at shutdown, after in-flight requests drained."""
    func.__servegrid_on_shutdown__ = True  # type: ignore[attr-defined]
    return func


def async_on_drain(func: Callable) -> Callable:
    """Run ``await self.func(timeout)`` when a stop begins, beside the request plane's drain.

    For work the SDK does not see (an HTTP listener): stop taking new work at once, finish
    what is in flight within ``timeout`` seconds, then return.
    """
    func.__servegrid_on_drain__ = True  # type: ignore[attr-defined]
    return func


def service(
    cls: type | None = None,
    *,
    namespace: str | None = None,
    resources: dict[str, Any] | None = None,
    workers: int = 1,
    name: str | None = None,
    **extra: Any,
) -> Any:
    """Declare a service: ``@service(namespace="demo", resources={"gpu": 1}, workers=2)``."""

    def decorate(klass: T) -> T:
        spec = ServiceSpec(
            cls=klass,
            name=name or klass.__name__,
            namespace=namespace or DEFAULT_NAMESPACE,
            namespace_explicit=namespace is not None,
            resources=dict(resources or {}),
            workers=workers,
            extra=extra,
        )
        for base in reversed(klass.__mro__):
            inherited = base.__dict__.get("__servegrid__")
            if isinstance(inherited, ServiceSpec) and base is not klass:
                spec.dependencies.update(inherited.dependencies)
        for attr_name in dir(klass):
            member = getattr(klass, attr_name, None)
            if member is None or not callable(member):
                continue
            endpoint_name = getattr(member, "__servegrid_endpoint__", None)
            if endpoint_name is not None:
                request_type, response_type = _endpoint_types(member)
                spec.endpoints[endpoint_name] = EndpointSpec(
                    name=endpoint_name,
                    method_name=attr_name,
                    streaming=inspect.isasyncgenfunction(member),
                    request_type=request_type,
                    response_type=response_type,
                )
            if getattr(member, "__servegrid_on_start__", False):
                spec.on_start.append(attr_name)
            if getattr(member, "__servegrid_on_shutdown__", False):
                spec.on_shutdown.append(attr_name)
            if getattr(member, "__servegrid_on_drain__", False):
                spec.on_drain.append(attr_name)
        for attr_name, value in klass.__dict__.items():
            if getattr(value, "__servegrid_dependency__", False):
                spec.dependencies[attr_name] = value
        klass.__servegrid__ = spec  # type: ignore[attr-defined]
        klass.link = classmethod(_link)  # type: ignore[attr-defined]
        klass.address = classmethod(address)  # type: ignore[attr-defined]
        return klass

    if cls is not None:
        return decorate(cls)
    return decorate


def spec_of(cls: Any) -> ServiceSpec:
    spec = getattr(cls, "__servegrid__", None)
    if not isinstance(spec, ServiceSpec) or spec.cls is not cls:
        raise TypeError(f"{getattr(cls, '__name__', cls)!r} is not a @service class")
    return spec


def is_service(cls: Any) -> bool:
    spec = getattr(cls, "__servegrid__", None)
    return isinstance(spec, ServiceSpec) and spec.cls is cls


def _link(cls: type, other: type) -> type:
    from servegrid.sdk.graph import links_of_caller

    # The edge belongs to the graph module that states it (the caller), not to the process.
    links_of_caller(depth=1).link(cls, other)
    return other


def address(cls: type) -> tuple[str, str]:
    """``(namespace, name)`` under which the service's endpoints are registered.

    The namespace, first found: the config's ``ServiceArgs.namespace`` (``servegrid serve``
    writes the graph's resolved namespace there), ``SERVEGRID_NAMESPACE``, the one named in
    ``@service(namespace=...)``, else ``servegrid``.
    """
    import os

    from servegrid.distributed.env import SERVEGRID_NAMESPACE
    from servegrid.sdk.config import ServiceConfig

    spec = spec_of(cls)
    args = ServiceConfig.get_instance().service_args(spec.name)
    namespace = args.get("namespace") or os.environ.get(SERVEGRID_NAMESPACE) or spec.namespace
    return str(namespace), spec.name
