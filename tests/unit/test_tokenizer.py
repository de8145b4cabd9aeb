"""Tokenizer, chat template and the incremental detokenizer with stop strings."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from servegrid.llm.detokenizer import IncrementalDetokenizer
from servegrid.llm.model_init import init_model
from servegrid.llm.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer

UNICODE_TEXT = (
    "Hello, world! Café crème brûlée in Zürich — “quoted” text… 你好 世界"
    " こんにちは 안녕하세요 привет 🚀🌊🍞 ✨ naïve façade, emoji 👩‍👩‍👧 done.\n"
)

BOTH = pytest.mark.parametrize("use_rust", [True, False], ids=["decode-stream", "python"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return load_tokenizer(model_dir)


def stream(tok, chunks, **kwargs) -> tuple[str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    text = "".join(detok.feed(c) for c in chunks) + detok.flush()
    return text, detok


def test_encode_decode_round_trip_with_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\n" + UNICODE_TEXT + "<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\n" + UNICODE_TEXT
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user")
    assert tok.eos_token_ids == {0, 2}
    assert tok.special_ids == {0, 1, 2}


def test_chat_template_renders_chatml_with_generation_prompt(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "assistant\n"
    )


def test_a_directorys_own_template_gets_bos_token_and_raise_exception(tmp_path, model_dir):
    custom = tmp_path / "custom"
    shutil.copytree(model_dir, custom)
    config_path = custom / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    config_path.write_text(json.dumps(config))
    tok = Tokenizer(custom)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|>[user] x\n"
    with pytest.raises(ChatTemplateError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_cannot_reach_python_internals(tok, tmp_path, model_dir):
    custom = tmp_path / "evil"
    shutil.copytree(model_dir, custom)
    config_path = custom / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__ }}"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError):
        Tokenizer(custom).apply_chat_template([{"role": "user", "content": "x"}])


@BOTH
def test_detokenizer_one_token_at_a_time_equals_full_decode(tok, use_rust):
    ids = tok.encode(UNICODE_TEXT * 3)
    text, _ = stream(tok, [[i] for i in ids], use_rust=use_rust)
    assert text == tok.decode(ids)


@BOTH
def test_detokenizer_split_at_every_boundary_equals_full_decode(tok, use_rust):
    ids = tok.encode(UNICODE_TEXT)
    full = tok.decode(ids)
    for k in range(len(ids) + 1):
        text, _ = stream(tok, [ids[:k], ids[k:]], use_rust=use_rust)
        assert text == full, k


@BOTH
def test_detokenizer_never_emits_half_a_character(tok, use_rust):
    ids = tok.encode("🚀🌊🍞👩‍👩‍👧")
    assert len(ids) > 4  # the emoji really are split over several byte tokens
    detok = IncrementalDetokenizer(tok, use_rust=use_rust)
    deltas = [detok.feed([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "🚀🌊🍞👩‍👩‍👧"


@BOTH
def test_detokenizer_matches_full_decode_on_random_ids(tok, use_rust):
    rng = random.Random(5)
    ids = [rng.randrange(3, tok.vocab_size) for _ in range(2000)]
    chunks = []
    i = 0
    while i < len(ids):
        n = rng.randint(1, 4)
        chunks.append(ids[i : i + n])
        i += n
    text, _ = stream(tok, chunks, use_rust=use_rust)
    assert text == tok.decode(ids)


@BOTH
def test_detokenizer_uses_prompt_context(tok, use_rust):
    prompt = tok.encode("<|im_start|>assistant\n")
    text, _ = stream(
        tok, [[i] for i in tok.encode(" and then")], prompt_ids=prompt, use_rust=use_rust
    )
    assert text == " and then"


@BOTH
def test_stop_string_cuts_the_text_before_it_across_token_boundaries(tok, use_rust):
    ids = tok.encode("The river runs. STOP here and more text")
    text, detok = stream(tok, [[i] for i in ids], stop=["STOP"], use_rust=use_rust)
    assert text == "The river runs. "
    assert detok.stopped and detok.stop_matched == "STOP"
    assert detok.feed(tok.encode(" later")) == ""


@BOTH
def test_stop_string_prefix_is_held_back_then_released(tok, use_rust):
    detok = IncrementalDetokenizer(tok, stop=["<END>"], use_rust=use_rust)
    out = detok.feed(tok.encode("value <EN"))
    assert out == "value "  # "<EN" could still become "<END>"
    out += detok.feed(tok.encode("D? no"))
    assert out == "value <END? no"
    assert not detok.stopped
    assert detok.flush() == ""


@BOTH
def test_earliest_of_several_stop_strings_wins(tok, use_rust):
    text, detok = stream(
        tok, [tok.encode("one two three four")], stop=["four", "two"], use_rust=use_rust
    )
    assert text == "one "
    assert detok.stop_matched == "two"


@BOTH
def test_held_stop_prefix_is_flushed_at_the_end(tok, use_rust):
    text, detok = stream(
        tok, [[i] for i in tok.encode("ends with ST")], stop=["STOP"], use_rust=use_rust
    )
    assert text == "ends with ST"
    assert not detok.stopped
