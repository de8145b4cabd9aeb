"""Aggregated: every DummyWorker prefills and decodes itself."""

from components.frontend import Frontend
from components.processor import Processor
from components.router import Router
from components.worker import DummyWorker

Frontend.link(Processor).link(Router)
Processor.link(DummyWorker)

__all__ = ["DummyWorker", "Frontend", "Processor", "Router"]
