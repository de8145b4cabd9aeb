"""Disaggregated: DummyWorkers push prefills to the queue that PrefillWorkers pull from."""

from components.frontend import Frontend
from components.prefill_worker import PrefillWorker
from components.processor import Processor
from components.router import Router
from components.worker import DummyWorker

Frontend.link(Processor).link(Router)
Processor.link(DummyWorker).link(PrefillWorker)

__all__ = ["DummyWorker", "Frontend", "PrefillWorker", "Processor", "Router"]
