"""Errors raised by a component in another process reach the HTTP layer as the same class."""

from __future__ import annotations

import pytest

from servegrid.components.errors import as_client_error
from servegrid.distributed.discovery.file import FileDiscovery
from servegrid.distributed.errors import NoInstancesError, RemoteError
from servegrid.distributed.runtime import DistributedRuntime
from servegrid.engines.base import PromptTooLongError
from servegrid.http.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    NoWorkersError,
)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (PromptTooLongError("prompt has 9000 tokens"), ContextLengthExceededError),
        (ContextLengthExceededError("prompt has 9000 characters"), ContextLengthExceededError),
        (InvalidRequestError("bad"), InvalidRequestError),
        (ModelNotFoundError("no model m"), ModelNotFoundError),
        (NoWorkersError("none"), NoWorkersError),
    ],
)
async def test_remote_errors_keep_their_class_across_the_request_plane(tmp_path, raised, expected):
    server = DistributedRuntime(FileDiscovery(tmp_path))
    caller = DistributedRuntime(FileDiscovery(tmp_path))
    try:

        async def fail(_: None) -> None:
            raise raised

        await server.namespace("t").component("C").endpoint("fail").serve(fail, instance_id=3)
        client = await caller.namespace("t").component("C").endpoint("fail").client()
        with pytest.raises(RemoteError) as info:
            await (await client.round_robin(None)).single()
        mapped = as_client_error(info.value)
        assert type(mapped) is expected
        assert str(raised) in mapped.message
    finally:
        await caller.shutdown(drain_timeout=0)
        await server.shutdown(drain_timeout=0)


def test_no_instances_means_no_workers():
    assert isinstance(as_client_error(NoInstancesError("none of Worker")), NoWorkersError)


def test_unknown_errors_are_left_alone():
    error = RuntimeError("bug")
    assert as_client_error(error) is error
