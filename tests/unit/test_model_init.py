"""Building the tiny model offline, and resolving a config's ``model`` value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servegrid.llm.model_init import (
    BUILTIN_MODEL,
    ModelNotFoundError,
    default_model_dir,
    ensure_model,
    init_model,
)


def read_all(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_init_model_writes_a_hugging_face_directory(tmp_path):
    model = init_model(tmp_path / "m")
    names = set(os.listdir(model))
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
    } <= names
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == 2048
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"


def test_init_model_is_deterministic_across_processes(tmp_path):
    init_model(tmp_path / "a")
    code = "import sys; from pathlib import Path; from servegrid.llm.model_init import init_model;"
    code += " init_model(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")], check=True, env=env, timeout=120
    )
    assert read_all(tmp_path / "a") == read_all(tmp_path / "b")


def test_init_model_refuses_to_overwrite_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        init_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_ensure_model_builds_the_builtin_model_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEGRID_HOME", str(tmp_path))
    path = ensure_model(BUILTIN_MODEL)
    assert path == default_model_dir() == tmp_path / "models" / "tiny-chat"
    assert (path / "tokenizer.json").is_file()
    assert ensure_model(BUILTIN_MODEL) == path


def test_ensure_model_accepts_any_local_directory_with_a_tokenizer(tmp_path):
    model = init_model(tmp_path / "m", vocab_size=400)
    assert ensure_model(str(model)) == model


def test_ensure_model_names_a_missing_path_and_how_to_fix_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError) as err:
        ensure_model(missing)
    assert str(missing) in str(err.value)
    assert f"servegrid model init {missing}" in str(err.value)


def test_ensure_model_names_the_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"tokenizer\.json or tokenizer_config\.json"):
        ensure_model(tmp_path)
