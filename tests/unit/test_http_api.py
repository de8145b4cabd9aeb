"""The OpenAI HTTP layer as clients see it: the official ``openai`` client and raw requests.

A real ``OpenAIHttpServer`` on a loopback port, with a small in-test backend standing in for the
Frontend service (the backend boundary is the contract under test, not a mock of a server).
"""

from __future__ import annotations

import asyncio
import re
from itertools import pairwise

import httpx
import openai
import pytest

from servegrid.http import (
    InvalidRequestError,
    ModelNotFoundError,
    NoWorkersError,
    OpenAIHttpServer,
)
from servegrid.http.openai_app import _RequestIds
from servegrid.llm.protocol import GenerateChunk, TextRequest

MODEL = "tiny"
PROMPT_LIMIT = 200  # characters; stands in for max-model-len


class FakeFrontend:
    """Answers ``tok0 tok1 ...`` up to max_tokens, two tokens per chunk, and fails on cue."""

    def __init__(self) -> None:
        self.served = [MODEL]
        self.parents: dict[str, str] = {}  # LoRA adapter -> base model
        self.workers = 1
        self.requests: list[TextRequest] = []

    def models(self) -> list[str]:
        return list(self.served)

    def model_parent(self, model: str) -> str | None:
        return self.parents.get(model)

    async def generate(self, request: TextRequest):
        self.requests.append(request)
        if request.model not in self.served:
            raise ModelNotFoundError(f"The model '{request.model}' does not exist.")
        if self.workers == 0:
            raise NoWorkersError(f"No worker is serving '{request.model}' right now; retry.")
        text = request.prompt or " ".join(m["content"] for m in request.messages or [])
        if len(text) > PROMPT_LIMIT:
            raise InvalidRequestError(
                f"The prompt is {len(text)} characters, more than the limit {PROMPT_LIMIT}.",
                param="messages",
            )
        if "explode" in text:
            raise RuntimeError("secret internal detail")
        n = request.max_tokens or 6
        done = 0
        while done < n:
            step = min(2, n - done)
            words = "".join(f"tok{done + i} " for i in range(step))
            done += step
            if "fail-later" in text and done > 2:
                raise RuntimeError("worker died")
            yield GenerateChunk(
                text=words,
                completion_tokens=done,
                prompt_tokens=len(text.split()) if done == step else 0,
                cached_tokens=1 if done == step else 0,
                finish_reason="length" if done == n else None,
            )


@pytest.fixture
async def frontend():
    return FakeFrontend()


@pytest.fixture
async def server(frontend):
    srv = OpenAIHttpServer(frontend, "127.0.0.1", 0)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(timeout_s=5)


@pytest.fixture
async def client(server):
    c = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0
    )
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as c:
        yield c


CHAT = [{"role": "user", "content": "hello there"}]


async def test_chat_completion_returns_text_and_usage(client, frontend):
    r = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 2
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == 7
    assert r.usage.prompt_tokens_details.cached_tokens == 1
    sent = frontend.requests[-1]
    assert sent.kind == "chat" and sent.max_tokens == 5
    assert sent.messages == [{"role": "user", "content": "hello there"}]


async def test_request_ids_are_unambiguous_and_neighbours_look_different(client, frontend):
    """Ids show up in logs next to each other: each has fixed-width parts split by a dash,
    and consecutive ones differ in nearly every digit, not only in the last."""
    first = await client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    second = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    pattern = re.compile(r"^(cmpl|chatcmpl)-([0-9a-f]{12})-([0-9a-f]{16})$")
    ids = [first.id, second.id]
    assert [frontend.requests[-2].request_id, frontend.requests[-1].request_id] == ids
    (kind_a, process_a, seq_a), (kind_b, process_b, seq_b) = (
        pattern.fullmatch(i).groups() for i in ids
    )
    assert (kind_a, kind_b) == ("cmpl", "chatcmpl") and process_a == process_b
    assert sum(a != b for a, b in zip(seq_a, seq_b, strict=True)) >= 8

    ids = _RequestIds()  # unique over many, and each neighbour pair far apart
    many = [ids.next("completion") for _ in range(20000)]
    assert len(set(many)) == len(many)
    tails = [i.rsplit("-", 1)[1] for i in many]
    differing = [sum(a != b for a, b in zip(x, y, strict=True)) for x, y in pairwise(tails)]
    assert min(differing) >= 8


async def test_chat_request_fields_reach_the_backend(client, frontend):
    await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=3,
        max_tokens=99,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop="END",
        presence_penalty=0.1,
        frequency_penalty=0.2,
        user="u1",
        extra_body={"ignore_eos": True, "some_unknown_field": {"x": 1}},
    )
    sent = frontend.requests[-1]
    assert sent.messages[1] == {"role": "user", "content": "a\nb"}
    assert sent.max_tokens == 3  # max_completion_tokens wins
    assert (sent.temperature, sent.top_p, sent.seed) == (0.5, 0.9, 7)
    assert sent.stop == ["END"]
    assert sent.ignore_eos is True


async def test_chat_stream_sends_role_then_deltas_then_finish_and_usage(client):
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 1


async def test_chat_stream_without_usage_has_no_usage_chunk(client):
    stream = await client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2, stream=True
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_completion_and_echo(client, frontend):
    r = await client.completions.create(model=MODEL, prompt="Once", max_tokens=3)
    assert r.object == "text_completion"
    assert r.choices[0].text == "tok0 tok1 tok2 "
    assert r.usage.completion_tokens == 3
    assert frontend.requests[-1].prompt == "Once"
    r = await client.completions.create(model=MODEL, prompt=["Once"], max_tokens=1, echo=True)
    assert r.choices[0].text == "Oncetok0 "


async def test_completion_default_max_tokens_is_16(client, frontend):
    await client.completions.create(model=MODEL, prompt="x")
    assert frontend.requests[-1].max_tokens == 16


async def test_completion_stream(client):
    stream = await client.completions.create(
        model=MODEL, prompt="Once", max_tokens=4, stream=True, echo=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == "Oncetok0 tok1 tok2 tok3 "
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_models_lists_a_lora_adapter_with_its_base_model_as_parent(http, frontend):
    frontend.served = [MODEL, "my-adapter"]
    frontend.parents = {"my-adapter": MODEL}
    data = (await http.get("/v1/models")).json()["data"]
    assert [(m["id"], m.get("parent")) for m in data] == [(MODEL, None), ("my-adapter", MODEL)]


async def test_models_and_health(http, frontend):
    r = await http.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    r = await http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": [MODEL]}
    frontend.served = []
    r = await http.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


async def _still_serving(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1}
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "tok0 "


BAD_REQUESTS = [
    pytest.param(b"{not json", "not valid JSON", None, id="invalid-json"),
    pytest.param(b"[1, 2]", "must be a JSON object", None, id="not-an-object"),
    pytest.param(b"", "empty", None, id="empty-body"),
    pytest.param({"model": MODEL}, "'messages': field required", "messages", id="no-messages"),
    pytest.param({"model": MODEL, "messages": []}, "'messages'", "messages", id="empty-messages"),
    pytest.param(
        {"model": MODEL, "messages": "hi"}, "'messages': Input should be", "messages", id="msg-type"
    ),
    pytest.param(
        {"model": MODEL, "messages": CHAT, "max_tokens": -3},
        "'max_tokens': Input should be greater than or equal to 1",
        "max_tokens",
        id="negative-max-tokens",
    ),
    pytest.param(
        {"model": MODEL, "messages": CHAT, "max_tokens": "many"},
        "'max_tokens'",
        "max_tokens",
        id="max-tokens-type",
    ),
    pytest.param(
        {"model": MODEL, "messages": CHAT, "temperature": 3},
        "'temperature'",
        "temperature",
        id="temperature-range",
    ),
    pytest.param(
        {"model": MODEL, "messages": CHAT, "n": 2}, "only n=1 is supported", "n", id="n-above-1"
    ),
    pytest.param(
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "only 'text' parts are supported",
        "messages.0.content",
        id="image-part",
    ),
    pytest.param(
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        "'messages.0.role'",
        "messages.0.role",
        id="bad-role",
    ),
    pytest.param({"model": MODEL, "messages": CHAT, "stop": 5}, "'stop'", "stop", id="stop-type"),
    pytest.param(
        {"model": MODEL, "messages": CHAT, "seed": 2**64 + 1},
        "'seed': Input should be less than or equal to 9223372036854775807",
        "seed",
        id="seed-above-2**64",
    ),
    pytest.param(
        {"model": MODEL, "messages": CHAT, "seed": -(2**63) - 1}, "'seed'", "seed", id="seed-low"
    ),
]


@pytest.mark.parametrize(("body", "message_part", "param"), BAD_REQUESTS)
async def test_bad_chat_request_is_400_naming_the_field(http, body, message_part, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = await http.post("/v1/chat/completions", **kwargs)
    err = _error(r, 400)
    assert message_part in err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert "Traceback" not in r.text
    await _still_serving(http)


async def test_bad_completion_prompt_is_400(http):
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert "only one prompt" in _error(r, 400)["message"]
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2]})
    assert _error(r, 400)["param"] == "prompt"


async def test_unknown_model_is_404(http, client):
    r = await http.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    err = _error(r, 404)
    assert err["code"] == "model_not_found" and "nope" in err["message"]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=CHAT, stream=True)
    await _still_serving(http)


async def test_no_workers_is_503(http, frontend):
    frontend.workers = 0
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    assert _error(r, 503)["code"] == "no_workers"
    frontend.workers = 1
    await _still_serving(http)


async def test_prompt_too_long_is_400_from_backend(http):
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 500})
    err = _error(r, 400)
    assert "more than the limit" in err["message"] and err["param"] == "messages"


async def test_backend_crash_is_500_without_internals(http, caplog):
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "explode"})
    err = _error(r, 500)
    assert "secret" not in r.text
    assert "internal error" in err["message"]
    assert "secret internal detail" in caplog.text  # logged server-side with the traceback
    await _still_serving(http)


async def test_backend_crash_mid_stream_ends_stream_with_error_event(http, client):
    body = {"model": MODEL, "prompt": "fail-later", "stream": True, "max_tokens": 10}
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 200
    events = [line for line in r.text.split("\n\n") if line]
    assert '"text":"tok0 tok1 "' in events[0]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    with pytest.raises(openai.APIError):
        stream = await client.completions.create(
            model=MODEL, prompt="fail-later", max_tokens=10, stream=True
        )
        async for _ in stream:
            pass
    await _still_serving(http)


async def test_unknown_route_404_and_wrong_method_405(http):
    r = await http.get("/v2/everything")
    assert _error(r, 404)["type"] == "not_found_error"
    r = await http.get("/v1/chat/completions")
    _error(r, 405)
    assert r.headers["allow"] == "POST"
    r = await http.post("/v1/models", json={})
    _error(r, 405)
    await _still_serving(http)


async def test_metrics_count_requests_tokens_and_latency(http, client):
    await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    stream = await client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, stream=True
    )
    async for _ in stream:
        pass
    await http.post("/v1/chat/completions", json={"model": MODEL})
    r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    lines = dict(
        line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#")
    )
    chat = 'servegrid_frontend_requests_total{endpoint="/v1/chat/completions",status="%s"}'
    assert lines[chat % "200"] == "2"
    assert lines[chat % "400"] == "1"
    assert lines["servegrid_frontend_output_tokens_total"] == "8"
    assert lines["servegrid_frontend_time_to_first_token_seconds_count"] == "2"
    assert lines["servegrid_frontend_request_duration_seconds_count"] == "2"
    assert lines['servegrid_frontend_request_duration_seconds_bucket{le="+Inf"}'] == "2"
    assert int(lines["servegrid_frontend_inter_token_latency_seconds_count"]) == 2  # 1 gap each
    assert lines["servegrid_frontend_inflight_requests"] == "0"


async def test_concurrent_streams_are_independent(client):
    async def one(n: int) -> str:
        stream = await client.completions.create(
            model=MODEL, prompt="go", max_tokens=n, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(1, 21))), 20)
    for n, text in enumerate(results, start=1):
        assert text == "".join(f"tok{i} " for i in range(n))
