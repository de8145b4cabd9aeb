"""Building the tiny model offline, and resolving a config's ``model`` value."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servegrid.llm.model_init import (
    BUILTIN_MODEL,
    BUILTIN_REVISION,
    ModelNotFoundError,
    default_model_dir,
    ensure_model,
    init_model,
)


def read_safetensors_parameters(path: Path) -> int:
    """Parameters a safetensors file declares, checking its offsets tile the data exactly."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__", None)
    spans = sorted(tuple(t["data_offsets"]) for t in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    total = 0
    for tensor in header.values():
        count = 1
        for dim in tensor["shape"]:
            count *= dim
        assert (
            tensor["dtype"] == "F32"
            and 4 * count == tensor["data_offsets"][1] - tensor["data_offsets"][0]
        )
        total += count
    return total


def read_all(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_init_model_writes_a_hugging_face_directory(tmp_path):
    model = init_model(tmp_path / "m")
    names = set(os.listdir(model))
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    } <= names
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == 2048
    assert 2_000_000 < read_safetensors_parameters(model / "model.safetensors") < 5_000_000
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
    assert path == default_model_dir() == tmp_path / "models" / f"tiny-chat-r{BUILTIN_REVISION}"
    assert (path / "tokenizer.json").is_file()
    assert not (path / "model.safetensors").exists()  # the mocker needs no weights
    assert ensure_model(BUILTIN_MODEL) == path
    # An engine that runs the model asks for weights; the existing directory gets them.
    assert ensure_model(BUILTIN_MODEL, weights=True) == path
    assert (path / "model.safetensors").is_file()


def test_model_init_cli_without_weights_writes_only_the_tokenizer(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "servegrid.cli",
            "model",
            "init",
            "--no-weights",
            str(tmp_path / "m"),
        ],
        check=True,
        timeout=120,
    )
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert not (tmp_path / "m" / "model.safetensors").exists()


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
