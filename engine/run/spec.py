"""Does a model spec describe the model? Checks shared by the Recorder and every reader of a run.

A run is explained from its spec (``engine.model.task``): the model and data are rebuilt,
never pickled. The Recorder checks the spec against the live model before the first step
(``check_live``), so a wrong import path, wrong keyword arguments or another data seed is
refused before training rather than found after it; verify and explain check the rebuilt
model and data against the record (``check_model_matches``, ``check_data_matches``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from engine.errors import BadInputError, CorruptRunError, ExplaindError
from engine.model.task import Dataset, Task, data_fingerprint, get_task

if TYPE_CHECKING:
    from engine.run.history import History

FORWARD_EXAMPLES = 4  # training examples in the forward that compares the rebuilt model with the live one
FORWARD_RTOL = 1e-4   # largest difference of the two outputs, relative to the live output's largest value


def floating_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The model's floating-point buffers by name (BatchNorm running statistics and the like)."""
    return {name: b for name, b in model.named_buffers() if b.is_floating_point()}


def _shapes(named: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in named.items()}


def _difference(what: str, live: dict[str, tuple[int, ...]], rebuilt: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference between the live and the rebuilt model's tensors of one kind, in words."""
    missing = [n for n in live if n not in rebuilt]
    if missing:
        return f"the rebuilt model lacks {what}(s) {missing[:5]}"
    extra = [n for n in rebuilt if n not in live]
    if extra:
        return f"the rebuilt model has {what}(s) {extra[:5]} that the live model lacks"
    for name, shape in live.items():
        if rebuilt[name] != shape:
            return f"{what} {name!r} has shape {shape} in the live model but {rebuilt[name]} in the rebuilt one"
    return None


def check_live(model: nn.Module, spec: Mapping[str, Any], inputs: Tensor, labels: Tensor) -> Task:
    """Rebuild ``spec`` and refuse it unless it describes ``model`` and its training data.

    Checks, in order: the spec builds (import paths, keyword arguments); parameter and
    floating-buffer names and shapes; the training data's fingerprint; and one forward in
    evaluation mode on the first training examples with the live parameters and buffers.
    Raises ``BadInputError`` naming the first difference. The live model is left as it was.
    """
    where = f"model spec {dict(spec)}"
    try:
        task = get_task(dict(spec))
        rebuilt = task.build_model()
        train = task.dataset("train")
    except ExplaindError as exc:
        raise BadInputError(f"the Recorder cannot rebuild the {where}: {exc}") from exc
    except Exception as exc:  # the user's own model or data code
        raise BadInputError(f"the Recorder cannot rebuild the {where}: {type(exc).__name__}: {exc}") from exc
    live_params, live_buffers = dict(model.named_parameters()), floating_buffers(model)
    for what, live, built in (("parameter", live_params, dict(rebuilt.named_parameters())),
                              ("floating buffer", live_buffers, floating_buffers(rebuilt))):
        difference = _difference(what, _shapes(live), _shapes(built))
        if difference is not None:
            raise BadInputError(f"the {where} does not build the model being trained: {difference}; "
                                "fix the model import path or model_kwargs")
    if train.fingerprint() != data_fingerprint(inputs, labels):
        raise BadInputError(
            f"the training data rebuilt from the {where} differs from train_data given to the Recorder "
            f"(rebuilt: {len(train)} examples, inputs {train.inputs.dtype} {tuple(train.inputs.shape)}; given: "
            f"{labels.shape[0]} examples, inputs {inputs.dtype} {tuple(inputs.shape)}); pass the data the spec "
            "builds, or fix the data import path or data_kwargs (e.g. the seed)"
        )
    _check_forward(model, rebuilt, live_params, live_buffers, inputs[:FORWARD_EXAMPLES], where)
    return task


def _check_forward(model: nn.Module, rebuilt: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                   inputs: Tensor, where: str) -> None:
    """One evaluation-mode forward of both models on ``inputs``, the live parameters and buffers in both."""
    reference = next(iter(params.values()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    x = inputs.to(dtype) if inputs.is_floating_point() else inputs
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            live = model(x.to(device))
            state = {n: t.detach().cpu() for n, t in {**params, **buffers}.items()}
            built = functional_call(rebuilt.to(dtype).eval(), state, (x,))
    finally:
        for module, training in modes.items():
            module.training = training
    if not isinstance(live, Tensor) or not isinstance(built, Tensor):
        kind = type(live if not isinstance(live, Tensor) else built).__name__
        raise BadInputError(
            f"the model returns a {kind}, not a tensor: the engine needs forward(inputs) -> tensor of outputs "
            "(wrap Hugging Face models with engine.model.hf:causal_lm)"
        )
    live = live.detach().cpu()
    if live.shape != built.shape:
        raise BadInputError(f"the rebuilt model of the {where} outputs shape {tuple(built.shape)} where the live "
                            f"model outputs {tuple(live.shape)}; fix the model import path or model_kwargs")
    scale = float(live.abs().max()) if live.numel() else 0.0
    gap = float((live.double() - built.double()).abs().max()) if live.numel() else 0.0
    if not gap <= FORWARD_RTOL * scale + torch.finfo(dtype).tiny:
        raise BadInputError(
            f"the model rebuilt from the {where}, given the live parameters and buffers, computes other outputs "
            f"than the live model on the first training examples (largest difference {gap:.3g} at output scale "
            f"{scale:.3g}): the spec describes another architecture; fix the model import path or model_kwargs"
        )


def check_model_matches(history: History, task: Task) -> nn.Module:
    """Rebuild the recorded model and check its parameter and buffer names and shapes against the record."""
    model = task.build_model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, recorded in history.param_shapes.items():
        if name not in shapes:
            raise CorruptRunError(
                f"{history.path}/manifest.json records parameter {name!r}, which the rebuilt model "
                f"({history.model_spec}) does not have"
            )
        if shapes[name] != recorded:
            raise CorruptRunError(
                f"{history.path}/manifest.json records {name!r} with shape {recorded}, but the rebuilt model "
                f"has {shapes[name]}: the model spec does not match the recording"
            )
    buffers = _shapes(floating_buffers(model))
    for name, recorded in history.buffer_shapes.items():
        if buffers.get(name) != recorded:
            raise CorruptRunError(
                f"{history.path}/manifest.json records buffer {name!r} with shape {recorded}, but the rebuilt "
                f"model has {buffers.get(name, 'no such buffer')}: the model spec does not match the recording"
            )
    return model


def check_data_matches(history: History, task: Task) -> Dataset:
    """The rebuilt training set, checked against the recorded fingerprint."""
    train = task.dataset("train")
    if len(train) != history.n_train:
        raise CorruptRunError(
            f"{history.path}/manifest.json records {history.n_train} training examples, but the task rebuilds "
            f"{len(train)}; the batch ids of the record do not index this data set"
        )
    if train.fingerprint() != history.manifest["data"]["fingerprint"]:
        raise CorruptRunError(
            f"{history.path}: the training data rebuilt from the spec differs from the data recorded "
            "(fingerprint mismatch); the task configuration or data function changed since recording"
        )
    return train
