"""Frontend: ``POST /generate`` with ``{"prompt": ..., "request_id": ...}`` → the reply as JSON.

A deliberately small HTTP/1.1 server on asyncio (one request per connection), so the example
needs nothing beyond servegrid; a real frontend would use a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import msgspec

from components.processor import Processor
from components.protocol import NAMESPACE, GenerateRequest
from servegrid.sdk import async_on_shutdown, async_on_start, depends, endpoint, service

MAX_BODY = 1 << 20


@service(namespace=NAMESPACE)
class Frontend:
    processor = depends(Processor)

    def __init__(self, port: int = 8000, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.server: asyncio.Server | None = None

    @async_on_start
    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, self.host, self.port)
        print(f"hello-world frontend on http://{self.host}:{self.port}/generate", flush=True)

    @async_on_shutdown
    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    @endpoint()
    async def health(self, _: None = None) -> str:
        return "ok"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await self.respond(reader)
        except (asyncio.IncompleteReadError, ValueError, ConnectionError):
            status, body = 400, {"error": "malformed HTTP request"}
        except Exception as exc:  # the worker failed: say so, keep serving
            status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}
        writer.write(
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def respond(self, reader: asyncio.StreamReader) -> tuple[int, dict]:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
        length = int({k.strip().lower(): v for k, v in headers.items()}.get("content-length", 0))
        if length > MAX_BODY:
            return 400, {"error": "body too large"}
        body = await reader.readexactly(length)
        if (method, path) != ("POST", "/generate"):
            return 404, {"error": "POST /generate is the only route"}
        try:
            request = msgspec.json.decode(body, type=GenerateRequest)
        except msgspec.DecodeError as exc:
            return 400, {"error": f'expected {{"prompt": str, "request_id": str}}: {exc}'}
        async for reply in self.processor.generate(request):
            return 200, msgspec.to_builtins(reply)
        return 500, {"error": "the worker sent no reply"}
