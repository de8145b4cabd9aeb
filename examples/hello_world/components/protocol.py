"""What the hello-world services send each other (plain msgspec structs on the wire)."""

from __future__ import annotations

import msgspec

NAMESPACE = "hello"
PREFILL_QUEUE = "prefill"  # the work queue decode workers push to and prefill workers pull from
PREFILL_DONE = "prefill_done"  # event subject: a prefill worker finished a request


class GenerateRequest(msgspec.Struct):
    prompt: str
    request_id: str


class GenerateReply(msgspec.Struct):
    worker_output: str
    request_id: str


class PrefillJob(msgspec.Struct):
    prompt: str
    request_id: str
