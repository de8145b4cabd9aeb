"""Endpoint clients: find the instances of an endpoint and send them requests.

A client watches discovery for its endpoint and keeps the membership it last saw, so that
requests keep flowing while the discovery store is unreachable. An instance whose connection
fails is skipped at once (and for ``DOWN_FOR`` seconds, or until it re-registers); a request
that failed before receiving any response is retried on another instance.

An instance that leaves discovery gets no new requests, but its connection stays open until
the streams it carries have ended: a stopping instance deregisters first and then drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from servegrid.distributed.discovery.base import InstanceInfo, instance_prefix
from servegrid.distributed.errors import (
    ConnectionLostError,
    InstanceUnavailableError,
    NoInstancesError,
)
from servegrid.distributed.retry import Backoff
from servegrid.distributed.transport.client import ResponseStream

if TYPE_CHECKING:
    from servegrid.distributed.runtime import DistributedRuntime

log = logging.getLogger(__name__)

DOWN_FOR = 5.0
MAX_ATTEMPTS = 3


class EndpointClient:
    def __init__(
        self, runtime: DistributedRuntime, namespace: str, component: str, endpoint: str
    ) -> None:
        self._runtime = runtime
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self._instances: dict[int, InstanceInfo] = {}
        self._ids: list[int] = []
        self._down: dict[int, float] = {}
        self._rr = 0
        self._changed = asyncio.Event()
        self._watch_task: asyncio.Task | None = None
        self._synced = asyncio.Event()

    # -- membership --------------------------------------------------------------------
    async def start(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch())
        if not self._synced.is_set():
            # The first listing arrives at once; waiting for it avoids a spurious "no
            # instances" on the first requests. Every caller waits, not only the one that
            # started the watch: concurrent first requests would otherwise see no instances.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), 2.0)

    async def _watch(self) -> None:
        prefix = instance_prefix(self.namespace, self.component, self.endpoint)
        discovery = self._runtime.discovery
        backoff = Backoff(start=0.5, maximum=5.0)
        while True:
            try:
                initial = await discovery.list(prefix)
                self._instances = {info.instance_id: info for info in initial}
                self._refresh()
                self._synced.set()
                backoff.reset()
                async for event in discovery.watch(prefix):
                    if event.kind == "put" and event.instance is not None:
                        info = event.instance
                        self._instances[info.instance_id] = info
                        self._down.pop(info.instance_id, None)
                    else:
                        instance_id = int(event.key.rsplit("/", 1)[1], 16)
                        self._instances.pop(instance_id, None)
                        # Never drop: the instance may be draining the streams we sent it.
                        self._runtime.pool.retire(instance_id)
                    self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the last membership; try again shortly
                log.warning("watch of %s failed (%s); keeping last known instances", prefix, exc)
                self._synced.set()
                await backoff.sleep()

    def _refresh(self) -> None:
        self._ids = sorted(self._instances)
        self._changed.set()
        self._changed = asyncio.Event()

    def instance_ids(self) -> list[int]:
        """Live instances, without those that just failed to answer."""
        if not self._down:
            return self._ids
        now = time.monotonic()
        for instance_id, until in list(self._down.items()):
            if until < now:
                del self._down[instance_id]
        return [i for i in self._ids if i not in self._down]

    def instances(self) -> list[InstanceInfo]:
        return [self._instances[i] for i in self.instance_ids()]

    async def wait_for_instances(self, count: int = 1, timeout: float = 30.0) -> list[int]:
        await self.start()
        deadline = time.monotonic() + timeout
        while len(self.instance_ids()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoInstancesError(
                    f"{self.namespace}.{self.component}.{self.endpoint}: "
                    f"{len(self.instance_ids())} of {count} instances after {timeout:.0f}s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return self.instance_ids()

    def mark_down(self, instance_id: int) -> None:
        self._down[instance_id] = time.monotonic() + DOWN_FOR
        self._runtime.pool.drop(instance_id)

    # -- requests ----------------------------------------------------------------------
    async def direct(
        self, payload: Any, instance_id: int, response_type: Any = None
    ) -> ResponseStream:
        info = self._instances.get(instance_id)
        if info is None:
            raise NoInstancesError(
                f"instance {instance_id:x} of {self.component}.{self.endpoint} is not registered"
            )
        try:
            conn = await self._runtime.pool.get(instance_id, info.host, info.port)
            return conn.call(self.endpoint, payload, response_type)
        except InstanceUnavailableError:
            self.mark_down(instance_id)
            raise

    async def random(self, payload: Any, response_type: Any = None) -> ResponseStream:
        return await self._pick_and_call(payload, response_type, round_robin=False)

    async def round_robin(self, payload: Any, response_type: Any = None) -> ResponseStream:
        return await self._pick_and_call(payload, response_type, round_robin=True)

    generate = round_robin

    async def _pick_and_call(
        self, payload: Any, response_type: Any, round_robin: bool
    ) -> ResponseStream:
        if not self._synced.is_set():
            await self.start()
        last_error: Exception | None = None
        for _ in range(MAX_ATTEMPTS):
            ids = self.instance_ids()
            if not ids:
                break
            if round_robin:
                self._rr += 1
                instance_id = ids[self._rr % len(ids)]
            else:
                instance_id = random.choice(ids)
            try:
                return await self.direct(payload, instance_id, response_type)
            except InstanceUnavailableError as exc:
                last_error = exc
        raise NoInstancesError(
            f"no live instance of {self.namespace}.{self.component}.{self.endpoint}"
            + (f" (last error: {last_error})" if last_error else "")
        )

    def pick(self, exclude: set[int] | frozenset[int] = frozenset()) -> int | None:
        """A live instance by round robin, skipping ``exclude``; None when none is left."""
        ids = [i for i in self.instance_ids() if i not in exclude]
        if not ids:
            return None
        self._rr += 1
        return ids[self._rr % len(ids)]

    async def call_with_retry(
        self,
        payload: Any,
        response_type: Any = None,
        instance_id: int | None = None,
        *,
        max_attempts: int = MAX_ATTEMPTS,
    ):
        """Stream responses; if an instance fails before its first response, retry elsewhere.

        The rules: a request is sent again only while nothing of its answer has been
        received (a started stream is never repeated: the caller would see responses
        twice), at most ``max_attempts`` sends in all, each to an instance not tried yet;
        an instance that fails is marked down, so other requests skip it too.
        ``instance_id`` is the preferred instance (a router's choice); if it is gone or
        refuses the connection, another live instance serves the request instead.

        A stream that breaks after its first response raises ``ConnectionLostError`` (with
        the instance id); continuing it is the caller's job (the Processor migrates it).
        """
        tried: set[int] = set()
        last_error: Exception | None = None
        for _ in range(max_attempts):
            if instance_id is not None and instance_id not in tried:
                target: int | None = instance_id
            else:
                if not self._synced.is_set():
                    await self.start()
                target = self.pick(tried)
            if target is None:
                break
            tried.add(target)
            try:
                stream = await self.direct(payload, target, response_type)
            except (InstanceUnavailableError, NoInstancesError) as exc:
                last_error = exc  # direct() marked it down
                continue
            try:
                async for item in stream:
                    yield item
                return
            except InstanceUnavailableError as exc:  # nothing received: safe to send again
                self.mark_down(target)
                last_error = exc
            except ConnectionLostError as exc:
                self.mark_down(target)
                exc.instance_id = target
                raise
            finally:
                await stream.aclose()
        raise NoInstancesError(
            f"no live instance of {self.namespace}.{self.component}.{self.endpoint} "
            f"after {len(tried)} attempt(s)"
            + (f" (last error: {last_error})" if last_error else "")
        )

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None
