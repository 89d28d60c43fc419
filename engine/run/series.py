"""Open a checkpoint series with its model and explained inputs: ``open_series``.

The model comes from the checkpoints' own ``config.json`` (Hugging Face folders) or from a
model spec given by the user (JSON text or a ``.json`` file):

- a Hugging Face config (``{"model_type": "gpt2", ...}``): a ``transformers`` causal LM;
- a built-in task (``{"task": "modular-addition", "config": {...}}``) or an import spec with a
  data function (``{"model": ..., "data": ...}``): that task's classifier, explained on one of
  its splits (``INPUTS`` = ``val``, ``val:16``, ``train:ids=3,7`` …);
- an import spec with a model only (``{"model": "pkg.mod:Class", "model_kwargs": {...}}``): a
  causal LM returning logits ``(n, L, vocab)``.

A language model is explained on token sequences read from a file (``engine.model.lm``); texts
are tokenized by ``--tokenizer DIR`` or the checkpoints' own tokenizer, which must fit the
model's vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import BadInputError
from engine.model import hf
from engine.model.lm import NextTokenLogProbs, TokenInputs, read_token_inputs, transformer_layer
from engine.model.task import get_task, load_object, seeded_model
from engine.run.checkpoints import Checkpoint, CheckpointSeries, SeriesTask, find_checkpoints, load_buffers


@dataclass(frozen=True)
class SeriesSource:
    """Where a checkpoint series, its model and its explained inputs come from.

    Attributes:
        sources: a folder of ``checkpoint-<step>`` folders, or checkpoints in training order.
        inputs: a file of token ids or texts (language models), or a split spec (task models).
        model: a model spec as JSON text or the path of a ``.json`` file (default: the
            checkpoints' ``config.json``).
        steps: the training step of each checkpoint (default: from the names).
        tokenizer: folder of the tokenizer for text inputs (default: the checkpoints').
        max_inputs: explain only the first sequences of the inputs file.
    """

    sources: tuple[str, ...]
    inputs: str
    model: str | None = None
    steps: tuple[int, ...] | None = None
    tokenizer: str | None = None
    max_inputs: int | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise BadInputError("give the checkpoints: a folder of checkpoint-<step> folders or several checkpoints")
        if self.max_inputs is not None and self.max_inputs < 1:
            raise BadInputError(f"max_inputs must be a positive integer, got {self.max_inputs}")


@dataclass(frozen=True)
class OpenedSeries:
    """A checked series, the task it is explained with, and what the inputs were."""

    series: CheckpointSeries
    task: SeriesTask
    inputs: dict[str, Any]        # description stored with the run (source, count, digest)
    test_spec: str | None         # which examples of a task split (``val:16``); None: every input sequence


def open_series(source: SeriesSource) -> OpenedSeries:
    """Find and check the checkpoints, build the model, read the inputs; nothing is computed yet."""
    checkpoints = find_checkpoints(source.sources, source.steps)
    spec = _model_spec(source.model, checkpoints)
    if "model_type" in spec:
        lm = hf.checkpoint_lm(spec)
        return _language_model(source, checkpoints, spec, lm, hf.ignored_keys(lm), hf.max_positions(spec))
    if "task" in spec or "data" in spec:
        return _task_model(source, checkpoints, spec)
    if "model" in spec:
        unknown = sorted(set(spec) - {"model", "model_kwargs"})
        if unknown:
            raise BadInputError(f"a language-model spec has 'model' and 'model_kwargs' only (found "
                                f"{', '.join(unknown)})")
        factory = load_object(spec["model"], "model")
        kwargs = dict(spec.get("model_kwargs") or {})
        try:
            lm = seeded_model(lambda: factory(**kwargs), int(kwargs.get("seed", 0)))
        except TypeError as exc:
            raise BadInputError(f"model {spec['model']!r} rejected model_kwargs {kwargs}: {exc}") from exc
        if not isinstance(lm, nn.Module):
            raise BadInputError(f"model {spec['model']!r} built a {type(lm).__name__}, not a torch.nn.Module")
        return _language_model(source, checkpoints, spec, lm, (), None)
    raise BadInputError(f"model spec with keys {sorted(spec)} names no model: give a Hugging Face config "
                        "('model_type'), a built-in task ('task') or an import path ('model')")


def _model_spec(given: str | None, checkpoints: list[Checkpoint]) -> dict[str, Any]:
    if given is not None:
        text = given
        if not given.lstrip().startswith("{"):
            path = Path(given)
            if not path.is_file():
                raise BadInputError(f"model spec {given!r} is neither JSON nor a .json file")
            text = path.read_text()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"model spec is not valid JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise BadInputError("a model spec is a JSON object")
        return spec
    configs = [c for c in checkpoints if c.config is not None]
    if len(configs) < len(checkpoints):
        missing = next(c for c in checkpoints if c.config is None)
        raise BadInputError(f"{missing.label} has no config.json: give the model with --model SPEC (a Hugging Face "
                            "config, a built-in task or an import path, as JSON or a .json file)")
    first = hf.read_config(configs[0].config)
    reference = hf.architecture(first)
    for checkpoint in configs[1:]:
        other = hf.architecture(hf.read_config(checkpoint.config))
        diff = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        if diff:
            shown = ", ".join(f"{k}: {reference.get(k)!r} vs {other.get(k)!r}" for k in diff[:4])
            raise BadInputError(f"{checkpoint.label} is of a different architecture than {checkpoints[0].label} "
                                f"(config.json differs in {shown})")
    return first


def _vocab_size(lm: nn.Module) -> int:
    """The number of logits the model returns per position."""
    try:
        with torch.no_grad():
            out = lm(torch.zeros(1, 2, dtype=torch.int64))
    except Exception as exc:  # the user's model code: any error it raises
        raise BadInputError(f"the language model fails on a sequence of two tokens ({type(exc).__name__}: {exc}); "
                            "it must take token ids (batch, position)") from exc
    logits = out if isinstance(out, torch.Tensor) else out.logits
    if logits.dim() != 3:
        raise BadInputError(f"the language model returned shape {tuple(logits.shape)}; it must return logits "
                            "(batch, position, vocabulary)")
    return int(logits.shape[-1])


def _language_model(source: SeriesSource, checkpoints: list[Checkpoint], spec: dict[str, Any], lm: nn.Module,
                    ignored: tuple[str, ...], max_length: int | None) -> OpenedSeries:
    model = NextTokenLogProbs(lm).eval()
    series = CheckpointSeries.open(checkpoints, model, spec, ignored)
    load_buffers(model, series.saved_buffers)
    vocab = _vocab_size(lm)
    tokenize = decode = None
    folder = _tokenizer_folder(source.tokenizer, checkpoints)
    if folder is not None:
        tokenizer = hf.load_tokenizer(folder)
        if len(tokenizer) > vocab:
            raise BadInputError(f"the tokenizer in {folder} has {len(tokenizer)} tokens, more than the model's "
                                f"vocabulary of {vocab}: it belongs to another model")
        tokenize = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        decode = tokenizer.decode
    if source.inputs.split(":")[0] in ("train", "val"):
        raise BadInputError(f"inputs {source.inputs!r} name a task split, but a language model is explained on a "
                            "file of token ids or texts")
    tokens: TokenInputs = read_token_inputs(Path(source.inputs), vocab, tokenize, decode, max_length,
                                            source.max_inputs)
    task = SeriesTask(model, tokens.dataset(), spec, transformer_layer, tokens.texts)
    description = {"source": source.inputs, "sequences": len(tokens.texts),
                   "tokens": int((tokens.lengths).sum()), "digest": tokens.digest(),
                   "tokenizer": None if folder is None else str(folder)}
    return OpenedSeries(series, task, description, None)


def _tokenizer_folder(given: str | None, checkpoints: list[Checkpoint]) -> Path | None:
    if given is not None:
        if not hf.has_tokenizer(Path(given)):
            raise BadInputError(f"{given} holds no tokenizer ({', '.join(hf.TOKENIZER_FILES)})")
        return Path(given)
    for checkpoint in reversed(checkpoints):
        if checkpoint.path.is_dir() and hf.has_tokenizer(checkpoint.path):
            return checkpoint.path
    return None


def _task_model(source: SeriesSource, checkpoints: list[Checkpoint], spec: dict[str, Any]) -> OpenedSeries:
    task = get_task(spec)
    model = task.build_model().eval()
    series = CheckpointSeries.open(checkpoints, model, task.spec())
    load_buffers(model, series.saved_buffers)
    split = source.inputs.split(":")[0]
    if split not in ("train", "val"):
        raise BadInputError(f"inputs {source.inputs!r} must be a split of task {task.name!r}: val, val:N, val:all or "
                            "val:ids=I,J (or train…)")
    data = task.dataset(split)
    explained = SeriesTask(model, data, task.spec(), task.layer_of)
    return OpenedSeries(series, explained, {"source": source.inputs, "split_size": len(data)}, source.inputs)
