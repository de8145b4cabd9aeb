"""Disaggregated serving with a Router choosing the decode worker (``Router.router-mode``)."""

from servegrid.components.frontend import Frontend
from servegrid.components.prefill_worker import PrefillWorker
from servegrid.components.processor import Processor
from servegrid.components.router import Router
from servegrid.components.worker import Worker

Frontend.link(Processor).link(Router).link(Worker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "Router", "Worker"]
