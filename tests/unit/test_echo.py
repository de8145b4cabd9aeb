"""The echo engine and the engine registry."""

from __future__ import annotations

import pytest

from servegrid.engines.base import EngineConfigError, EngineRequest, SamplingParams
from servegrid.engines.echo import EchoEngine
from servegrid.engines.mocker import MockerEngine
from servegrid.engines.registry import UnknownEngineError, create_engine


def req(tokens: list[int], max_tokens: int) -> EngineRequest:
    return EngineRequest("r", tokens, SamplingParams(max_tokens=max_tokens))


async def test_echo_streams_the_prompt_one_token_per_output():
    engine = create_engine("echo", {})
    outputs = [o async for o in engine.generate(req([7, 8, 9], 10))]
    assert [o.token_ids for o in outputs] == [[7], [8], [9]]
    assert [o.finish_reason for o in outputs] == [None, None, "stop"]


async def test_echo_stops_at_max_tokens_with_length():
    engine = create_engine("echo", {})
    outputs = [o async for o in engine.generate(req([1, 2, 3, 4], 2))]
    assert [o.token_ids for o in outputs] == [[1], [2]]
    assert outputs[-1].finish_reason == "length"


async def test_echo_counts_active_requests_until_the_stream_closes():
    engine = create_engine("echo", {"echo-delay-ms": 1})
    stream = engine.generate(req([1, 2, 3], 3))
    await anext(stream)
    assert engine.load_metrics().active_requests == 1
    await stream.aclose()
    assert engine.load_metrics().active_requests == 0


def test_registry_builds_engines_by_name():
    assert isinstance(create_engine("echo", {}), EchoEngine)
    mocker = create_engine("mocker", {"block-size": 32, "unrelated-key": 1})
    assert isinstance(mocker, MockerEngine)
    assert mocker.config.block_size == 32


def test_registry_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(UnknownEngineError, match="choose one of: echo, mocker"):
        create_engine("mokcer", {})


def test_echo_rejects_a_bad_delay():
    with pytest.raises(EngineConfigError, match="echo-delay-ms"):
        create_engine("echo", {"echo-delay-ms": "soon"})
