"""Hugging Face ``transformers`` models, built from a config dict (the ``hf`` extra).

``transformers_model`` builds a randomly initialised model of any architecture
``transformers`` knows from a JSON-able config (``{"model_type": "gpt2", "n_layer": 2, …}``);
its parameters keep the names ``transformers`` gives them, so checkpoints of the same
architecture load into it. ``causal_lm`` is such a model shaped for the engine, which calls
``model(inputs)`` and expects a tensor: its forward takes token ids ``(batch, seq)`` and
returns the next-token logits at the last position ``(batch, vocab)``. Name it in a model spec
(``{"model": "engine.model.hf:causal_lm", "model_kwargs": {"config": {...}, "seed": 0}}``) and
record its training loop as any other.

``transformers`` is imported when a model is built, never at import of the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from engine.errors import BadInputError

KINDS = ("causal-lm",)
# attention by plain tensor operations (differentiable and vectorisable by torch.func), no key-value cache
_ENGINE_DEFAULTS = {"attn_implementation": "eager", "use_cache": False}


def transformers_model(config: Mapping[str, Any], kind: str = "causal-lm", seed: int = 0) -> nn.Module:
    """A randomly initialised ``transformers`` model (seeded, without disturbing the global random state).

    ``config`` holds ``model_type`` (``gpt2``, ``llama``, …) and that architecture's config
    fields; attention is set to the eager implementation and the key-value cache off unless
    the config says otherwise.
    """
    if kind not in KINDS:
        raise BadInputError(f"transformers model kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    try:
        import transformers
    except ImportError as exc:
        raise BadInputError("Hugging Face models need the transformers package: pip install 'explaind-studio[hf]'") \
            from exc
    fields = {**_ENGINE_DEFAULTS, **dict(config)}
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise BadInputError(f"a transformers config needs 'model_type' (e.g. 'gpt2' or 'llama'), got {dict(config)}")
    attention = fields.pop("attn_implementation")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"transformers cannot build a {model_type!r} config from {dict(config)}: {exc}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)


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
