"""Aggregated serving with a Router service choosing the worker (``Router.router-mode``)."""

from servegrid.components.frontend import Frontend
from servegrid.components.processor import Processor
from servegrid.components.router import Router
from servegrid.components.worker import Worker

Frontend.link(Processor).link(Router).link(Worker)

__all__ = ["Frontend", "Processor", "Router", "Worker"]
