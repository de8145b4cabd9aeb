"""Service classes for SDK unit tests (imported as tests.unit.graphs.shapes:Entry)."""

from __future__ import annotations

from servegrid.sdk import depends, endpoint, service


@service(namespace="shapes", resources={"gpu": 1}, workers=1, level="decorator")
class Leaf:
    def __init__(self, model: str, block_size: int = 16, level: str = "constructor") -> None:
        self.model = model
        self.block_size = block_size
        self.level = level

    @endpoint()
    async def generate(self, request: dict):
        yield request


@service(namespace="shapes")
class Router:
    leaf = depends(Leaf)

    @endpoint("route")
    async def pick(self, request: dict) -> int:
        return 0


@service(namespace="shapes")
class Middle:
    leaf = depends(Leaf)
    router = depends(Router)

    @endpoint()
    async def process(self, request: dict) -> dict:
        return request


@service(namespace="shapes")
class Entry:
    middle = depends(Middle)
    leaf = depends(Leaf)

    def __init__(self, port: int = 8000) -> None:
        self.port = port


@service(namespace="shapes")
class Lonely:
    """No dependencies and a required constructor argument."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key


@service(namespace="shapes")
class CycleA:
    pass


@service(namespace="shapes")
class CycleB:
    a = depends(CycleA)


CycleA.b = depends(CycleB)  # a cycle can only be made after the fact
