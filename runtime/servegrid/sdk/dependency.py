"""``depends(Other)``: call another service's endpoints as if they were local methods.

    class Processor:
        worker = depends(Worker)

        async def handle(self, request):
            async for out in self.worker.generate(request):       # streaming endpoint
                ...
            info = await self.worker.info()                        # one-response endpoint
            async for out in self.worker.direct(worker_id).generate(request):  # one instance
                ...

When the other service is hosted in the same process, the call is a plain method call;
otherwise it goes over the request plane to an instance found through discovery.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from servegrid.distributed.transport.codec import to_wire
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.service import EndpointSpec, spec_of


class Dependency:
    """Class attribute created by ``depends``; resolves to a ``ServiceClient`` on instances."""

    __servegrid_dependency__ = True

    def __init__(self, target: type) -> None:
        self.target = target
        self.attr_name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr_name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        client = instance.__dict__.get(self.attr_name)
        if client is None:
            client = ServiceClient(self.target)
            instance.__dict__[self.attr_name] = client
        return client

    @property
    def on(self) -> type:
        return self.target

    def __repr__(self) -> str:
        return f"depends({self.target.__name__})"


def depends(target: type) -> Any:
    """Declare that this service calls ``target``; deploying this one deploys that one."""
    spec_of(target)  # a clear TypeError now rather than a confusing failure at serve time
    return Dependency(target)


class ServiceClient:
    """Attribute access gives endpoint callers of the target service."""

    def __init__(self, target: type, instance_id: int | None = None) -> None:
        self._target = target
        self._spec = spec_of(target)
        self._instance_id = instance_id
        self._callers: dict[str, EndpointCaller] = {}

    def direct(self, instance_id: int) -> ServiceClient:
        """The same client, bound to one instance (e.g. the worker a router picked)."""
        return ServiceClient(self._target, instance_id)

    def __getattr__(self, name: str) -> EndpointCaller:
        if name.startswith("__"):
            raise AttributeError(name)
        caller = self._callers.get(name)
        if caller is None:
            endpoint = self._spec.endpoints.get(name) or next(
                (e for e in self._spec.endpoints.values() if e.method_name == name), None
            )
            if endpoint is None:
                known = ", ".join(sorted(self._spec.endpoints)) or "none"
                raise AttributeError(
                    f"{self._spec.name} has no endpoint {name!r} (endpoints: {known})"
                )
            caller = EndpointCaller(self._target, endpoint, self._instance_id)
            self._callers[name] = caller
        return caller

    async def client(self, endpoint: str) -> Any:
        """The low-level EndpointClient of one of the target's endpoints."""
        from servegrid.sdk.service import address

        namespace, component = address(self._target)
        return await servegrid_context.runtime.client(namespace, component, endpoint)


class EndpointCaller:
    __slots__ = ("_client", "_endpoint", "_instance_id", "_target")

    def __init__(self, target: type, endpoint: EndpointSpec, instance_id: int | None) -> None:
        self._target = target
        self._endpoint = endpoint
        self._instance_id = instance_id
        self._client: Any = None

    def __call__(self, request: Any = None) -> Any:
        local = servegrid_context.local_services.get(spec_of(self._target).name)
        if local is not None and self._instance_id is None:
            return getattr(local, self._endpoint.method_name)(request)
        if self._endpoint.streaming:
            return self._remote_stream(request)
        return self._remote_unary(request)

    async def _get_client(self) -> Any:
        if self._client is None:
            from servegrid.sdk.service import address

            namespace, component = address(self._target)
            self._client = await servegrid_context.runtime.client(
                namespace, component, self._endpoint.name
            )
        return self._client

    async def _remote_stream(self, request: Any) -> AsyncIterator[Any]:
        client = await self._get_client()
        stream = client.call_with_retry(
            to_wire(request), self._endpoint.response_type, instance_id=self._instance_id
        )
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    async def _remote_unary(self, request: Any) -> Any:
        client = await self._get_client()
        result = None
        async for item in client.call_with_retry(
            to_wire(request), self._endpoint.response_type, instance_id=self._instance_id
        ):
            result = item
        return result
