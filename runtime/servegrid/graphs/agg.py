"""Aggregated serving: the Processor picks a worker itself (``router: random | round-robin``)."""

from servegrid.components.frontend import Frontend
from servegrid.components.processor import Processor
from servegrid.components.worker import Worker

Frontend.link(Processor).link(Worker)

__all__ = ["Frontend", "Processor", "Worker"]
