"""Hugging Face ``transformers`` models and tokenizers, imported only when asked for (the ``hf`` extra).

``transformers_model`` builds a randomly initialised model of any architecture
``transformers`` knows from a JSON-able config (``{"model_type": "gpt2", "n_layer": 2, …}``);
its parameters keep the names ``transformers`` gives them, so checkpoints of the same
architecture load into it. Two shapes of it serve the engine:

* ``causal_lm`` for recorded training loops: its forward takes token ids ``(batch, seq)`` and
  returns the next-token logits at the last position ``(batch, vocab)`` — a tensor, as the
  engine expects of ``model(inputs)``. Name it in a model spec
  (``{"model": "engine.model.hf:causal_lm", "model_kwargs": {"config": {...}, "seed": 0}}``).
* ``checkpoint_lm`` for checkpoint series: the model of a checkpoint's ``config.json`` (its
  weights are the checkpoints', so the initialisation does not matter), returning
  ``transformers``' own output; ``engine.model.lm`` reads the logits of every position.

``load_tokenizer`` reads a checkpoint folder's tokenizer if it has one; ``ignored_keys`` are
the checkpoint entries the model class itself ignores when loading (old attention-mask
buffers). ``transformers`` is imported when a model is built, never at import of the engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from engine.errors import BadInputError
from engine.model.task import seeded_model

KINDS = ("causal-lm",)
# attention by plain tensor operations (differentiable and vectorisable by torch.func), no key-value cache
_ENGINE_DEFAULTS = {"attn_implementation": "eager", "use_cache": False}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# config.json entries that describe the file rather than the function the model computes
CONFIG_METADATA = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache")


def transformers() -> Any:
    """The ``transformers`` package, or a ``BadInputError`` saying how to install it."""
    try:
        import transformers as package
    except ImportError as exc:
        raise BadInputError("Hugging Face models need the optional package transformers: "
                            "pip install 'explaind-studio[hf]'") from exc
    return package


def transformers_model(config: Mapping[str, Any], kind: str = "causal-lm", seed: int = 0) -> nn.Module:
    """A randomly initialised ``transformers`` model (seeded, without disturbing the global random state).

    ``config`` holds ``model_type`` (``gpt2``, ``llama``, …) and that architecture's config
    fields; attention is set to the eager implementation and the key-value cache off unless
    the config says otherwise.
    """
    if kind not in KINDS:
        raise BadInputError(f"transformers model kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    package = transformers()
    fields = {**_ENGINE_DEFAULTS, **dict(config)}
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise BadInputError(f"a transformers config needs 'model_type' (e.g. 'gpt2' or 'llama'), got {dict(config)}")
    attention = fields.pop("attn_implementation")
    try:
        hf_config = package.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise BadInputError(f"transformers {package.__version__} cannot build model type {model_type!r} "
                            f"from {dict(config)}: {exc}") from exc
    try:
        return seeded_model(lambda: package.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention),
                            seed)
    except ValueError as exc:
        raise BadInputError(f"model type {model_type!r} has no causal language model in transformers "
                            f"{package.__version__}: {exc}") from exc


def _last_token_logits(module: nn.Module, args: tuple, output: Any) -> Tensor:
    return output.logits[:, -1]


def causal_lm(config: Mapping[str, Any], seed: int = 0) -> nn.Module:
    """A causal LM whose forward maps token ids ``(batch, seq)`` to next-token logits ``(batch, vocab)``.

    The model is ``transformers_model(config)`` itself (parameter names unchanged); a forward
    hook replaces its output by the logits of the last position.
    """
    model = transformers_model(config, "causal-lm", seed)
    model.register_forward_hook(_last_token_logits)
    return model


def checkpoint_lm(config: Mapping[str, Any]) -> nn.Module:
    """The causal LM of a checkpoint's ``config.json`` (file metadata ignored), returning ``transformers``' output."""
    return transformers_model(architecture(config))


def read_config(path: Path) -> dict[str, Any]:
    """A ``config.json`` as a dict; it must name its ``model_type``."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BadInputError(f"{path} is not a Hugging Face model config (it has no 'model_type')")
    return config


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a config that define the computed function (file metadata left out)."""
    return {k: v for k, v in config.items() if k not in CONFIG_METADATA}


def max_positions(config: Mapping[str, Any]) -> int | None:
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
