"""Build and locate small Hugging Face-format model directories, offline.

``init_model`` makes a tiny chat model directory (no weights): a byte-level BPE tokenizer
trained on the corpus shipped in ``llm/data/corpus.txt``, a ChatML chat template, and a
small llama-like ``config.json``. The output is byte-for-byte the same on every run, so tests
and clusters built from one release agree on token ids. ``ensure_model`` turns a graph
config's ``model`` value into a directory: the built-in name builds the default model on
first use; anything else must be a local HF directory with a tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from servegrid.distributed import env

# The one name configs use for the model servegrid builds itself.
BUILTIN_MODEL = "servegrid/tiny-chat"
DEFAULT_VOCAB_SIZE = 2048

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# ChatML, the layout most small chat models use. Content may be a string or a list of
# OpenAI-style parts; only text parts are rendered.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelNotFoundError(Exception):
    """A configured model is not a usable local model directory."""


def default_model_dir() -> Path:
    """Where the built-in model lives: ``$SERVEGRID_HOME/models/tiny-chat``."""
    home = os.environ.get(env.SERVEGRID_HOME)
    base = Path(home) if home else Path.home() / ".cache" / "servegrid"
    return base / "models" / "tiny-chat"


def _corpus_path() -> Path:
    return Path(str(resources.files("servegrid.llm") / "data" / "corpus.txt"))


def _train_tokenizer(vocab_size: int):
    # Imported here: only model building needs the trainer.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = _corpus_path().read_text(encoding="utf-8")
    # Paragraphs in file order: a fixed iterator order keeps training deterministic.
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def _model_files(vocab_size: int, tokenizer_json: str) -> dict[str, str]:
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "use_cache": True,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
        "torch_dtype": "float32",
    }
    generation_config = {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": [ids[EOS_TOKEN], ids["<|endoftext|>"]],
        "pad_token_id": ids[PAD_TOKEN],
        "do_sample": False,
        "max_new_tokens": 256,
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}

    def dump(obj: dict) -> str:
        return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": dump(tokenizer_config),
        "special_tokens_map.json": dump(special_tokens_map),
        "config.json": dump(config),
        "generation_config.json": dump(generation_config),
    }


def init_model(
    directory: Path, *, vocab_size: int = DEFAULT_VOCAB_SIZE, force: bool = False
) -> Path:
    """Write the tiny chat model into ``directory`` and return it.

    An existing model directory is left alone unless ``force``; a non-empty directory that
    is not a model is refused so a typo never overwrites someone's files.
    """
    directory = Path(directory).expanduser()
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + merges), got {vocab_size}")
    if directory.exists() and not force:
        if all((directory / f).is_file() for f in REQUIRED_FILES):
            return directory
        if directory.is_dir() and any(directory.iterdir()):
            raise FileExistsError(
                f"{directory} exists and is not a model directory; pick an empty path "
                "or pass --force to overwrite"
            )
    tok = _train_tokenizer(vocab_size)
    # The trainer may stop short of vocab_size on a small corpus; configs must say the truth.
    files = _model_files(tok.get_vocab_size(), tok.to_str(pretty=True) + "\n")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename, so a concurrent reader never sees half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is shared
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        # Only --force replaces; otherwise a directory that appeared meanwhile is another
        # process's identical model, and deleting it would pull it from under its readers.
        if force and directory.exists():
            shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
        try:
            tmp.rename(directory)
        except OSError:
            # Another process finished first; its files are identical.
            if not all((directory / f).is_file() for f in REQUIRED_FILES):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def ensure_model(path_or_name: str | os.PathLike[str]) -> Path:
    """The local model directory for a config's ``model`` value, building the built-in one.

    Raises ``ModelNotFoundError`` saying which path is wrong and how to make one.
    """
    value = os.fspath(path_or_name)
    if value == BUILTIN_MODEL:
        return init_model(default_model_dir())
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model {value!r}: {path} is not a directory. Use a local Hugging Face model "
            f"directory, the built-in model {BUILTIN_MODEL!r}, or create one with "
            f"`servegrid model init {path}`"
        )
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"model directory {path} has no {' or '.join(missing)}; it needs a Hugging Face "
            f"fast tokenizer. Create a model there with `servegrid model init {path}`"
        )
    return path
