"""Domain errors keep their class across the request plane; the HTTP edge maps them once."""

from __future__ import annotations

import pytest

from servegrid import errors
from servegrid.distributed.discovery.file import FileDiscovery
from servegrid.distributed.errors import NoInstancesError, RemoteError
from servegrid.distributed.runtime import DistributedRuntime
from servegrid.engines.base import PromptTooLongError
from servegrid.http.errors import http_error_for


@pytest.mark.parametrize(
    ("raised", "expected", "status", "code"),
    [
        (
            PromptTooLongError("9000 tokens"),
            errors.ContextLengthExceededError,
            400,
            "context_length_exceeded",
        ),
        (errors.InvalidRequestError("bad"), errors.InvalidRequestError, 400, None),
        (errors.ModelNotFoundError("no m"), errors.ModelNotFoundError, 404, "model_not_found"),
        (errors.NoWorkersError("none"), errors.NoWorkersError, 503, "no_workers"),
        (errors.WorkerLostError("gone"), errors.WorkerLostError, 503, "worker_lost"),
    ],
)
async def test_remote_domain_errors_keep_their_class_and_map_to_one_status(
    tmp_path, raised, expected, status, code
):
    server = DistributedRuntime(FileDiscovery(tmp_path))
    caller = DistributedRuntime(FileDiscovery(tmp_path))
    try:

        async def fail(_: None) -> None:
            raise raised

        await server.namespace("t").component("C").endpoint("fail").serve(fail, instance_id=3)
        client = await caller.namespace("t").component("C").endpoint("fail").client()
        with pytest.raises(errors.ServegridError) as info:
            await (await client.round_robin(None)).single()
        assert type(info.value) is expected
        assert str(raised) in info.value.message
        http = http_error_for(info.value)
        assert (http.status, http.code) == (status, code)
    finally:
        await caller.shutdown(drain_timeout=0)
        await server.shutdown(drain_timeout=0)


def test_no_instances_is_503_and_other_errors_are_not_client_errors():
    assert http_error_for(NoInstancesError("none of Worker")).status == 503
    assert http_error_for(RuntimeError("bug")) is None
    assert http_error_for(RemoteError("KeyError", "x")) is None


def test_llm_does_not_import_engines():
    import subprocess
    import sys

    code = (
        "import sys, servegrid.llm.protocol, servegrid.llm.openai_protocol;"
        "print([m for m in sys.modules if m.startswith('servegrid.engines')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
