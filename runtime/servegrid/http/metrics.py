"""Prometheus metrics of the Frontend's HTTP layer, rendered in the text exposition format.

No client library: a counter is a dict of floats, a histogram a list of bucket counts. Updates
happen on the event loop thread only, so they take no locks; ``render()`` runs on the same thread.
"""

from __future__ import annotations

from bisect import bisect_left

PREFIX = "servegrid_frontend_"

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)
OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically increasing count, optionally split by a fixed tuple of label names."""

    __slots__ = ("help", "labels", "name", "values")

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name = PREFIX + name
        self.help = help_text
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, label_values: tuple[str, ...] = (), amount: float = 1.0) -> None:
        values = self.values
        values[label_values] = values.get(label_values, 0.0) + amount

    def get(self, label_values: tuple[str, ...] = ()) -> float:
        return self.values.get(label_values, 0.0)

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} counter\n")
        if not self.labels and not self.values:
            out.append(f"{self.name} 0\n")
        for label_values, value in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.labels, label_values)} {_fmt(value)}\n")


class Gauge:
    """A value that goes up and down; a plain attribute so updates are one add."""

    __slots__ = ("help", "name", "value")

    def __init__(self, name: str, help_text: str) -> None:
        self.name = PREFIX + name
        self.help = help_text
        self.value = 0.0

    def render(self, out: list[str]) -> None:
        out.append(
            f"# HELP {self.name} {self.help}\n# TYPE {self.name} gauge\n"
            f"{self.name} {_fmt(self.value)}\n"
        )


class Histogram:
    """Fixed buckets; ``observe`` is one bisect and two adds, cumulation happens at render."""

    __slots__ = ("bounds", "count", "counts", "help", "name", "sum")

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...]) -> None:
        self.name = PREFIX + name
        self.help = help_text
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} histogram\n")
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}\n')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}\n')
        out.append(f"{self.name}_sum {self.sum!r}\n{self.name}_count {self.count}\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


class FrontendMetrics:
    """Every metric the HTTP layer records. The Frontend may pass one in to share or inspect it."""

    def __init__(self) -> None:
        self.requests = Counter(
            "requests_total",
            "HTTP requests answered, by endpoint and status.",
            ("endpoint", "status"),
        )
        self.inflight = Gauge("inflight_requests", "Generation requests being served now.")
        self.refused_connections = Counter(
            "refused_connections_total", "Connections answered 503 at the max-connections cap."
        )
        self.evicted_connections = Counter(
            "evicted_idle_connections_total",
            "Idle keep-alive connections closed at the max-connections cap to admit a new one.",
        )
        self.write_timeouts = Counter(
            "write_timeouts_total",
            "Connections closed (their request cancelled) because the client read nothing of "
            "its response for write-timeout-s.",
        )
        self.output_tokens = Counter("output_tokens_total", "Completion tokens sent to clients.")
        self.input_tokens = Counter("input_tokens_total", "Prompt tokens of served requests.")
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "From request received to first generated text.",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "inter_token_latency_seconds",
            "Gap between generated chunks divided by the tokens in the later chunk.",
            ITL_BUCKETS,
        )
        self.e2e = Histogram(
            "request_duration_seconds",
            "From request received to the last byte of a generation response.",
            E2E_BUCKETS,
        )

        self.routed = Counter(
            "routed_requests_total",
            "Generation requests routed to each worker (instance id in hex).",
            ("worker",),
        )
        self.route_overlap = Histogram(
            "route_overlap_blocks",
            "Prompt KV blocks the router found cached on the chosen worker, per decision.",
            OVERLAP_BUCKETS,
        )

    def record_route(self, worker_id: int, overlap_blocks: int) -> None:
        self.routed.inc((f"{worker_id:x}",))
        self.route_overlap.observe(overlap_blocks)

    def render(self) -> bytes:
        out: list[str] = []
        for metric in (
            self.requests,
            self.refused_connections,
            self.evicted_connections,
            self.write_timeouts,
            self.inflight,
            self.input_tokens,
            self.output_tokens,
            self.ttft,
            self.itl,
            self.e2e,
            self.routed,
            self.route_overlap,
        ):
            metric.render(out)
        return "".join(out).encode()
