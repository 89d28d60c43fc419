"""Hugging Face ``transformers`` models and tokenizers, imported only when asked for.

``causal_lm`` builds a causal language model from a ``config.json`` dictionary (weights are
the checkpoints', so the initialisation does not matter; it is seeded all the same);
``load_tokenizer`` reads a checkpoint folder's tokenizer if it has one; ``ignored_keys``
are the checkpoint entries the model class itself ignores when loading (old attention-mask
buffers). ``transformers`` is an optional dependency (``pip install 'explaind-studio[hf]'``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from engine.errors import BadInputError
from engine.model.task import seeded_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# config.json entries that describe the file rather than the function the model computes
CONFIG_METADATA = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache")


def transformers() -> Any:
    """The ``transformers`` package, or a ``BadInputError`` saying how to install it."""
    try:
        import transformers as package
    except ImportError as exc:
        raise BadInputError("Hugging Face checkpoints need the optional package transformers: "
                            "pip install 'explaind-studio[hf]'") from exc
    return package


def read_config(path: Path) -> dict[str, Any]:
    """A ``config.json`` as a dict; it must name its ``model_type``."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BadInputError(f"{path} is not a Hugging Face model config (it has no 'model_type')")
    return config


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config that define the computed function (file metadata left out)."""
    return {k: v for k, v in config.items() if k not in CONFIG_METADATA}


def causal_lm(config: dict[str, Any]) -> nn.Module:
    """A causal LM of ``config.json``'s architecture, without a key-value cache."""
    package = transformers()
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        hf_config = package.AutoConfig.for_model(config["model_type"], **fields)
    except (ValueError, KeyError) as exc:
        raise BadInputError(f"transformers {package.__version__} cannot build model type "
                            f"{config['model_type']!r}: {exc}") from exc
    hf_config.use_cache = False
    try:
        return seeded_model(lambda: package.AutoModelForCausalLM.from_config(hf_config), 0)
    except ValueError as exc:
        raise BadInputError(f"model type {config['model_type']!r} has no causal language model in transformers "
                            f"{package.__version__}: {exc}") from exc


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's position embeddings take, where the config says."""
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def ignored_keys(model: nn.Module) -> tuple[str, ...]:
    """Patterns of checkpoint entries the model class ignores when it loads a checkpoint."""
    return tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())


def is_ignored(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, key) for p in patterns)


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``."""
    package = transformers()
    try:
        return package.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"the tokenizer in {folder} cannot be loaded: {exc}") from exc
