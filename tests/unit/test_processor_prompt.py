"""The Processor's prompt path with the real built-in tokenizer: over-long prompts are refused
before tokenizing, and long ones are tokenized without stalling the event loop."""

from __future__ import annotations

import asyncio

import pytest

from servegrid.components.processor import OFF_LOOP_CHARS, Processor
from servegrid.errors import ContextLengthExceededError
from servegrid.http.errors import http_error_for
from servegrid.llm.model_init import BUILTIN_MODEL, ensure_model
from servegrid.llm.protocol import TextRequest
from servegrid.llm.tokenizer import load_tokenizer

MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ensure_model(BUILTIN_MODEL))


@pytest.fixture
def processor(tokenizer) -> Processor:
    processor = Processor(model=BUILTIN_MODEL, max_model_len=MAX_MODEL_LEN)
    processor.tokenizer = tokenizer
    return processor


def completion(prompt: str) -> TextRequest:
    return TextRequest(request_id="r", model=BUILTIN_MODEL, kind="completion", prompt=prompt)


def chat(content: str) -> TextRequest:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    return TextRequest(request_id="r", model=BUILTIN_MODEL, kind="chat", messages=messages)


def test_the_character_bound_follows_the_vocabulary(processor, tokenizer):
    longest = max(len(t) for t in tokenizer.hf.get_vocab(with_added_tokens=True))
    assert tokenizer.max_token_chars == longest
    assert processor.max_prompt_chars == MAX_MODEL_LEN * longest
    # Any prompt of max-model-len tokens is within it, however dense its tokens.
    dense = max(tokenizer.hf.get_vocab(with_added_tokens=False), key=len) * MAX_MODEL_LEN
    assert len(dense) <= processor.max_prompt_chars


@pytest.mark.parametrize(("make", "param"), [(completion, "prompt"), (chat, "messages")])
async def test_a_5mb_prompt_is_refused_by_its_length_in_characters(processor, make, param):
    request = make("word " * 1_000_000)
    chars = len(request.prompt or "") + sum(len(m["content"]) for m in request.messages or [])
    with pytest.raises(ContextLengthExceededError) as info:
        await processor._prompt_ids(request)
    error = info.value
    assert (error.code, error.param) == ("context_length_exceeded", param)
    assert http_error_for(error).status == 400
    # Counted in characters: the prompt was never tokenized.
    assert f"the prompt has {chars} characters" in error.message
    assert f"max-model-len of {MAX_MODEL_LEN} tokens" in error.message


async def test_a_long_prompt_is_tokenized_while_the_loop_serves_others(processor, tokenizer):
    prompt = "the river runs past the mill and on to the sea " * 1000  # 48,000 characters
    assert OFF_LOOP_CHARS < len(prompt) <= processor.max_prompt_chars
    ticks = 0
    done = False

    async def other_work() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    try:
        ids = await processor._prompt_ids(completion(prompt))
    finally:
        done = True
        await other
    assert ids == tokenizer.encode(prompt)
    assert ticks > 1, "the event loop ran nothing else while the prompt was tokenized"


async def test_a_prompt_within_the_bound_but_over_max_model_len_tokens_is_refused(processor):
    prompt = "the river runs past the mill and on to the sea " * 1000
    ids = await processor._prompt_ids(completion(prompt))
    assert len(ids) > MAX_MODEL_LEN
    with pytest.raises(ContextLengthExceededError, match=f"the prompt has {len(ids)} tokens"):
        processor._sampling(completion(prompt), len(ids))
    with pytest.raises(ContextLengthExceededError) as info:
        processor._sampling(TextRequest("r", BUILTIN_MODEL, "completion", max_tokens=10), 4090)
    assert info.value.param == "max_tokens"
