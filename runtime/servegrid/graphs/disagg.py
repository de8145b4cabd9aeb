"""Disaggregated serving: decode Workers push long prefills to PrefillWorkers (via the queue).

The Processor picks the decode worker itself (``router: random | round-robin``).
"""

from servegrid.components.frontend import Frontend
from servegrid.components.prefill_worker import PrefillWorker
from servegrid.components.processor import Processor
from servegrid.components.worker import Worker

Frontend.link(Processor).link(Worker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "Worker"]
