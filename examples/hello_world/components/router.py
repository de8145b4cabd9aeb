"""Router: sends a prompt to the worker that served the most similar prompt (prefix match).

A stand-in for KV-cache-aware routing: prompts that share a prefix share KV blocks, so they
go where those blocks already are. A prompt like none seen goes to the least used worker.
"""

from __future__ import annotations

import os
from collections import defaultdict, deque

from components.protocol import NAMESPACE
from components.worker import DummyWorker
from servegrid.sdk import depends, endpoint, service

MIN_SHARED_CHARS = 8  # "Tell me a " is similar; "The " is not
HISTORY = 256


def shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@service(namespace=NAMESPACE)
class Router:
    worker = depends(DummyWorker)

    def __init__(self) -> None:
        self.seen: dict[int, deque[str]] = defaultdict(lambda: deque(maxlen=HISTORY))
        self.workers = None

    @endpoint()
    async def route(self, prompt: str) -> int:
        if self.workers is None:
            self.workers = await self.worker.client("generate")
        ids = await self.workers.wait_for_instances(1)
        best, best_score = None, MIN_SHARED_CHARS - 1
        for worker_id in ids:
            score = max((shared_prefix(prompt, p) for p in self.seen[worker_id]), default=0)
            if score > best_score:
                best, best_score = worker_id, score
        if best is None:
            best = min(ids, key=lambda i: (len(self.seen[i]), i))
        self.seen[best].append(prompt)
        print(f"[router pid {os.getpid()}] {prompt!r} -> worker {best:x}", flush=True)
        return best
