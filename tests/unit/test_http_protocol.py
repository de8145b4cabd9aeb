"""OpenAI request models, stream event encoding and the Prometheus exposition, without a server."""

from __future__ import annotations

import msgspec
import pytest
from pydantic import ValidationError

from servegrid.http.metrics import FrontendMetrics
from servegrid.llm.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    StreamEncoder,
    describe_validation_error,
)


def _message(model_cls, body: bytes) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as info:
        model_cls.model_validate_json(body)
    return describe_validation_error(info.value)


def test_chat_request_converts_to_text_request():
    req = ChatCompletionRequest.model_validate_json(
        b'{"model":"m","messages":[{"role":"user","content":"hi","name":"ann"}],'
        b'"max_tokens":9,"stop":["a","b"],"seed":3,"tools":[{"unknown":1}]}'
    )
    text = req.to_text_request("id-1")
    assert (text.request_id, text.kind, text.max_tokens, text.stop, text.seed) == (
        "id-1",
        "chat",
        9,
        ["a", "b"],
        3,
    )
    assert text.messages == [{"role": "user", "content": "hi", "name": "ann"}]
    assert (text.temperature, text.top_p) == (1.0, 1.0)  # OpenAI defaults when omitted


def test_assistant_message_may_have_null_content():
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "assistant", "content": None}]}
    )
    assert req.to_text_request("x").messages == [{"role": "assistant", "content": ""}]


@pytest.mark.parametrize(
    ("body", "expected", "param"),
    [
        (b'{"model":"m","messages":[{"role":"user","content":"a"}],"top_p":0}', "'top_p'", "top_p"),
        (b'{"model":"","messages":[{"role":"user","content":"a"}]}', "'model'", "model"),
        (
            b'{"model":"m","messages":[{"role":"user","content":"a"}],"logprobs":true}',
            "logprobs are not supported",
            "logprobs",
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"a"}],"presence_penalty":5}',
            "'presence_penalty'",
            "presence_penalty",
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"a"}],"max_completion_tokens":0}',
            "'max_completion_tokens'",
            "max_completion_tokens",
        ),
    ],
)
def test_chat_constraints_name_the_field(body, expected, param):
    message, got_param = _message(ChatCompletionRequest, body)
    assert expected in message
    assert got_param == param


def test_completion_constraints():
    assert "best_of=1" in _message(CompletionRequest, b'{"model":"m","prompt":"a","best_of":2}')[0]
    assert "suffix" in _message(CompletionRequest, b'{"model":"m","prompt":"a","suffix":"z"}')[0]
    message, _ = _message(CompletionRequest, b'{"model":"m","prompt":"a","max_tokens":0,"n":3}')
    assert "'max_tokens'" in message and "'n'" in message


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stream_events_are_valid_json(kind):
    enc = StreamEncoder(kind, 'id"quoted', "model\\x", 123, include_usage=True)
    events = [enc.event('he said "hi"\n', None), enc.event("", "stop"), enc.usage_event(3, 2, 1)]
    decoded = []
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        decoded.append(msgspec.json.decode(event[6:-2]))
    assert decoded[0]["id"] == 'id"quoted' and decoded[0]["model"] == "model\\x"
    assert decoded[0]["usage"] is None
    if kind == "chat":
        assert decoded[0]["choices"][0]["delta"] == {
            "role": "assistant",
            "content": 'he said "hi"\n',
        }
        assert decoded[1]["choices"][0]["delta"] == {}
    else:
        assert decoded[0]["choices"][0]["text"] == 'he said "hi"\n'
    assert decoded[1]["choices"][0]["finish_reason"] == "stop"
    assert decoded[2]["choices"] == []
    assert decoded[2]["usage"]["total_tokens"] == 5
    assert decoded[2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}


def test_metrics_exposition():
    m = FrontendMetrics()
    m.requests.inc(("/v1/completions", "200"))
    m.requests.inc(("/v1/completions", "200"))
    m.ttft.observe(0.003)
    m.ttft.observe(100.0)
    m.inflight.value += 1
    text = m.render().decode()
    assert 'servegrid_frontend_requests_total{endpoint="/v1/completions",status="200"} 2\n' in text
    assert 'servegrid_frontend_time_to_first_token_seconds_bucket{le="0.0025"} 0\n' in text
    assert 'servegrid_frontend_time_to_first_token_seconds_bucket{le="0.005"} 1\n' in text
    assert 'servegrid_frontend_time_to_first_token_seconds_bucket{le="30"} 1\n' in text
    assert 'servegrid_frontend_time_to_first_token_seconds_bucket{le="+Inf"} 2\n' in text
    assert "servegrid_frontend_time_to_first_token_seconds_count 2\n" in text
    assert "servegrid_frontend_inflight_requests 1\n" in text
    assert "servegrid_frontend_output_tokens_total 0\n" in text
    assert "# TYPE servegrid_frontend_request_duration_seconds histogram\n" in text
