"""``OpenAIHttpServer``: the Frontend's OpenAI-compatible HTTP/1.1 listener.

Raw asyncio + httptools rather than an ASGI stack: the frontend shares a small machine with the
rest of the serving graph, and every microsecond of CPU per request counts. Usage::

    server = OpenAIHttpServer(backend, "0.0.0.0", 8000, limits=HttpLimits(max_connections=512))
    await server.start()
    ...
    await server.stop()  # stop accepting, let in-flight requests finish (bounded), close

The limits (``servegrid.http.limits``) are enforced by the connections as they parse, and by
one sweep over all connections a fraction of the shortest timeout apart (cheaper than a timer
per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time

from servegrid.http.connection import HttpConnection
from servegrid.http.limits import DEFAULT_LIMITS, HttpLimits
from servegrid.http.metrics import FrontendMetrics
from servegrid.http.openai_app import OpenAIApp, OpenAIBackend

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# File descriptors kept for everything but client connections (request plane, NATS, files).
FD_RESERVE = 256


def fit_connection_cap(wanted: int) -> int:
    """The connection cap this process can honour: raise the open-file limit for ``wanted``
    client connections if the hard limit allows, else lower the cap below it (and say so).
    A cap above the limit would let accept() fail first, and then /health fails too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if raised > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft >= need:
        return wanted
    cap = soft - FD_RESERVE if soft > 2 * FD_RESERVE else soft // 2
    log.warning(
        "max-connections %d needs %d open files but this process may open only %d; "
        "serving at most %d connections (raise `ulimit -n` or LimitNOFILE= to allow more)",
        wanted,
        need,
        soft,
        cap,
    )
    return cap


class OpenAIHttpServer:
    def __init__(
        self,
        backend: OpenAIBackend,
        host: str = "127.0.0.1",
        port: int = 8000,
        metrics: FrontendMetrics | None = None,
        *,
        limits: HttpLimits = DEFAULT_LIMITS,
        backlog: int = 2048,
    ) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics if metrics is not None else FrontendMetrics()
        self.app = OpenAIApp(backend, self.metrics)
        self.limits = limits
        self.max_connections = limits.max_connections  # lowered at start() to what fits
        self._backlog = backlog
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[HttpConnection] = set()
        self._all_closed: asyncio.Event | None = None
        self._reaper: asyncio.Task | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.max_connections = fit_connection_cap(self.limits.max_connections)
        try:
            self._server = await loop.create_server(
                lambda: HttpConnection(self, self.app, self.limits),
                self.host,
                self.port,
                backlog=self._backlog,
                reuse_address=True,
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on {self.host}:{self.port}: {exc.strerror}; "
                "choose another Frontend port or stop what is using it",
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        self._reaper = loop.create_task(self._sweep())
        log.info("OpenAI HTTP server listening on %s:%d", self.host, self.port)

    async def stop(self, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        if self._server is None:
            return
        self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        self._all_closed = asyncio.Event()
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout_s)
            except TimeoutError:
                log.warning(
                    "%d connection(s) still busy after %.0f s; closing them",
                    len(self._connections),
                    timeout_s,
                )
                for conn in list(self._connections):
                    conn.abort()
        await self._server.wait_closed()
        self._server = None

    # -- bookkeeping, called by connections -----------------------------------------------------
    def _connection_opened(self, conn: HttpConnection) -> bool:
        """Admit a new connection; False means it is over the cap and must be refused.

        At the cap the longest-idle connection (no request under way) is closed to make
        room: otherwise a flood of idle keep-alive connections would hold every slot, and
        /health with them, until they time out. Only when every connection is busy is the
        new one refused. The scan happens only at the cap, never on the request path.
        """
        if len(self._connections) >= self.max_connections:
            victim: HttpConnection | None = None
            for candidate in self._connections:
                if candidate.idle and (victim is None or candidate.idle_since < victim.idle_since):
                    victim = candidate
            if victim is None:
                self.metrics.refused_connections.inc()
                return False
            self._connections.discard(victim)  # its descriptor goes as soon as it closes
            self.metrics.evicted_connections.inc()
            victim.evict()
        self._connections.add(conn)
        if self._all_closed is not None:  # accepted just before close(): serve nothing more
            conn.shutdown()
        return True

    def _connection_closed(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)
        if self._all_closed is not None and not self._connections:
            self._all_closed.set()

    def _write_timed_out(self, conn: HttpConnection, stalled_s: float) -> None:
        self.metrics.write_timeouts.inc()
        log.info(
            "closing a client connection: it read none of its response for %.0f s "
            "(write-timeout-s %g); its request is cancelled",
            stalled_s,
            self.limits.write_timeout_s,
        )

    def _count_rejected(self, status: int) -> None:
        self.metrics.requests.inc(("other", str(status)))

    async def _sweep(self) -> None:
        # A timeout fires up to a quarter of itself late: one sweep costs less than a timer
        # per request.
        limits = self.limits
        shortest = min(
            limits.keepalive_timeout_s,
            limits.header_timeout_s,
            limits.body_timeout_s,
            limits.write_timeout_s,
        )
        period = max(0.05, min(1.0, shortest / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self._connections):
                conn.check_timeouts(now)

    @property
    def connection_count(self) -> int:
        return len(self._connections)
