"""Follow a discovery watch in the background and await conditions on what it reported."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from servegrid.distributed.discovery.base import Discovery, DiscoveryEvent, InstanceInfo


class WatchState:
    def __init__(self, discovery: Discovery, prefix: str) -> None:
        self.discovery = discovery
        self.prefix = prefix
        self.entries: dict[str, InstanceInfo] = {}
        self.events: list[DiscoveryEvent] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> WatchState:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _follow(self) -> None:
        async for event in self.discovery.watch(self.prefix):
            if event.kind == "put":
                assert event.instance is not None
                self.entries[event.key] = event.instance
            else:
                self.entries.pop(event.key, None)
            self.events.append(event)
            async with self._changed:
                self._changed.notify_all()

    def ids(self) -> set[int]:
        return {info.instance_id for info in self.entries.values()}

    async def wait_for(self, predicate: Callable[[WatchState], bool], timeout: float) -> None:
        """Until ``predicate(self)`` holds; ``TimeoutError`` with what was seen otherwise."""

        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"watch on {self.prefix} did not reach the expected state in {timeout}s; "
                f"it holds {sorted(hex(i) for i in self.ids())}"
            ) from None
