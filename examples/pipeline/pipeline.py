"""A three-service pipeline: Ingress → Shouter → Counter.

The smallest graph that shows every SDK feature: ``depends``, streaming and one-response
endpoints, lifecycle hooks, constructor config and several workers of one service.

    servegrid serve -f examples/pipeline/pipeline.yaml --working-dir examples/pipeline
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from servegrid.sdk import async_on_shutdown, async_on_start, depends, endpoint, service


@service(namespace="pipeline")
class Counter:
    """Counts the words of a text."""

    @endpoint()
    async def count(self, text: str) -> int:
        return len(text.split())


@service(namespace="pipeline", workers=1)
class Shouter:
    """Upper-cases text word by word, streaming; says which worker did it."""

    counter = depends(Counter)

    def __init__(self, suffix: str = "!", delay_first: float = 0.0) -> None:
        self.suffix = suffix
        # Seconds to think before the first word: lets a demo (or a test) kill a worker
        # while it holds a request that has no response yet, which the caller retries.
        self.delay_first = delay_first
        self.pid = os.getpid()

    @endpoint()
    async def shout(self, text: str) -> AsyncIterator[dict]:
        words = await self.counter.count(text)
        if self.delay_first:
            # Said before the wait, so a test can kill this worker while it holds the request.
            print(f"Shouter {self.pid} holding {text!r}", flush=True)
            await asyncio.sleep(self.delay_first)
        for word in text.split():
            yield {"word": word.upper() + self.suffix, "pid": self.pid, "words": words}


@service(namespace="pipeline")
class Ingress:
    """The entry point: joins the shouted words."""

    shouter = depends(Shouter)

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting
        self.served = 0

    @async_on_start
    async def started(self) -> None:
        print(f"Ingress up, greeting={self.greeting!r}", flush=True)

    @async_on_shutdown
    async def stopping(self) -> None:
        print(f"Ingress shutting down after {self.served} requests", flush=True)

    @endpoint()
    async def handle(self, text: str) -> dict:
        words: list[str] = []
        pids: set[int] = set()
        async for part in self.shouter.shout(f"{self.greeting} {text}"):
            words.append(part["word"])
            pids.add(part["pid"])
        self.served += 1
        return {"text": " ".join(words), "shouter_pids": sorted(pids)}
