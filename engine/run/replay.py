"""The training forward of a recorded step, replayed (MATH.md §6).

Per-example contributions to a step's update are the rows of the Jacobian of the
per-example losses ``(L_k)`` *of the batched training forward* with respect to θ: whatever
couples the examples (BatchNorm batch statistics) or randomises the forward (dropout), they
sum to the batch gradient exactly. ``TrainingForward`` replays that forward as it ran: the
recorded modules in training mode, the buffers ``b_s`` of the step, the recorded random
state, in the dtype of the training. It runs plain autograd on its own copy of the model,
so buffers the forward updates in place (running statistics, ``num_batches_tracked``) are
its own and never a captured tensor of a ``torch.func`` transform.

``choose_split`` decides, per run, between that batched replay and independent per-example
gradients (``vmap(grad)``, much cheaper): the latter only when nothing in the training
forward couples examples (BatchNorm in training mode), updates buffers or draws random
numbers — as recorded, and as one probing forward of the rebuilt model shows.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from engine.model.task import Task
from engine.run.history import History, Params, StepRecord

BATCHED = "batched"
PER_EXAMPLE = "per-example"
RANDOM_PROBE_EXAMPLES = 4  # training examples in the forward that looks for random numbers


@dataclass(frozen=True)
class DataSplit:
    """How a run's batch gradients are split into examples, and why, in words.

    ``unreplayed`` names what the batched replay cannot reproduce (random numbers recorded
    on another device, several forwards per step, …), None when it reproduces the forward.
    """

    mode: str
    reason: str
    unreplayed: str | None = None

    @property
    def note(self) -> str:
        """One line for the run's notes."""
        how = ("the batched training forward, replayed in train mode with the recorded buffers and random state"
               if self.mode == BATCHED else "independent per-example gradients (vmap of grad)")
        line = f"data split: {how} ({self.reason})"
        return line if self.unreplayed is None else f"{line}; not replayed exactly: {self.unreplayed}"


def in_training_modes(history: History, model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each module in the mode it had during the training forward (training
    mode, but for the modules the record lists in evaluation mode)."""
    forward = history.training_forward
    eval_modules = set(forward["eval_modules"]) if forward else set()
    copied = copy.deepcopy(model)
    for name, module in copied.named_modules():
        module.training = name not in eval_modules
    return copied


def _draws_random_numbers(history: History, model: nn.Module, inputs: Tensor) -> bool:
    """Whether one forward of ``model`` (on the CPU) in its training modes on ``inputs`` draws random numbers."""
    probe = in_training_modes(history, model).cpu()
    reference = next(probe.parameters(), None)
    x = inputs.to(reference.dtype) if inputs.is_floating_point() and reference is not None else inputs
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        state = torch.get_rng_state()
        probe(x.cpu())
        return not torch.equal(state, torch.get_rng_state())


def choose_split(history: History, model: nn.Module, device: torch.device, inputs: Tensor) -> DataSplit:
    """Batched replay when the training forward couples examples, updates buffers or draws random
    numbers (as recorded, and as a forward of the model on training ``inputs`` shows); else per-example."""
    forward = history.training_forward
    eval_modules = set(forward["eval_modules"]) if forward else set()
    causes = []
    coupled = [n for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in eval_modules]
    if coupled:
        causes.append(f"{type(model.get_submodule(coupled[0])).__name__} {coupled[0]!r} normalises over the batch")
    if history.changing_buffers:
        causes.append(f"buffers change during training ({', '.join(history.changing_buffers[:3])}"
                      f"{', …' if len(history.changing_buffers) > 3 else ''})")
    unreplayed = None
    if forward is not None and forward["random"]:
        causes.append("the training forward draws random numbers")
        if forward["device"] != device.type:
            unreplayed = (f"its random numbers were drawn on {forward['device']} and are replayed on {device.type}, "
                          "where the generator differs")
    elif _draws_random_numbers(history, model, inputs):
        causes.append("the training forward draws random numbers")
        unreplayed = ("the run records no random state (recorded before the engine kept it, or imported)"
                      if forward is None else "the recorder saw no random numbers drawn, so it kept no random state")
    if not causes:
        return DataSplit(PER_EXAMPLE, "nothing in the training forward couples examples or draws random numbers")
    if forward is not None and forward["irregular"] is not None and unreplayed is None:
        unreplayed = forward["irregular"]
    return DataSplit(BATCHED, "; ".join(causes), unreplayed)


class TrainingForward:
    """The batched training forward of recorded steps, on its own copy of ``model``.

    Args:
        history: the recorded run (for the module modes and the training dtype).
        task: its task (the per-example loss).
        model: the rebuilt model (checked against the record); it is copied, not changed.
        device: where to replay.
    """

    def __init__(self, history: History, task: Task, model: nn.Module, device: torch.device) -> None:
        forward = history.training_forward
        self.task = task
        self.device = device
        self.dtype = getattr(torch, forward["dtype"] if forward else history.manifest["dtype"])
        self.model = in_training_modes(history, model).to(device=device, dtype=self.dtype)
        self.names = list(history.param_names)

    def inputs(self, x: Tensor) -> Tensor:
        """Training inputs as the training forward saw them (its dtype, on the replay device)."""
        return x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)

    @contextlib.contextmanager
    def _random_state(self, record: StepRecord) -> Iterator[None]:
        """The recorded generator state for the forward; the global state is restored after."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            if record.rng is not None:
                torch.set_rng_state(record.rng.cpu.clone())
                if cuda and record.rng.cuda is not None:
                    torch.cuda.set_rng_state(record.rng.cuda.clone(), self.device)
            yield

    def _losses(self, record: StepRecord, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The per-example losses ``(B,)`` of the replayed forward at ``params`` (with the graph)."""
        buffers = {n: b.to(self.device, self.dtype, copy=True) for n, b in record.buffers.items()}
        with torch.enable_grad(), self._random_state(record):
            output = functional_call(self.model, {**params, **buffers}, (self.inputs(x),))
            return self.task.per_example_loss(output, y.to(self.device))

    def _leaves(self, record: StepRecord) -> Params:
        return {n: record.params[n].to(self.device, self.dtype, copy=True).requires_grad_() for n in self.names}

    def batch_gradient(self, record: StepRecord, x: Tensor, y: Tensor, weights: Tensor) -> Params:
        """``Σ_k w_k ∇L_k`` of step ``record.step`` by tensor name, in the training dtype."""
        params = self._leaves(record)
        losses = self._losses(record, params, x, y)
        total = (losses * weights.to(self.device, losses.dtype)).sum()
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)}

    def example_gradients(self, record: StepRecord, x: Tensor, y: Tensor, weights: Tensor, chunk: int) -> Tensor:
        """Rows ``w_k ∇_θ L_k`` of the batch's examples in batch order, flat in record order: ``(B, D)``.

        The Jacobian of the one forward's weighted losses, ``chunk`` rows per vectorised backward.
        """
        params = self._leaves(record)
        weighted = self._losses(record, params, x, y) * weights.to(self.device, self.dtype)  # (B,)
        leaves = list(params.values())
        count = weighted.shape[0]
        rows = []
        for a in range(0, count, chunk):
            b = min(a + chunk, count)
            picks = torch.zeros(b - a, count, dtype=weighted.dtype, device=self.device)
            picks[torch.arange(b - a), torch.arange(a, b)] = 1.0
            grads = torch.autograd.grad(weighted, leaves, grad_outputs=picks, is_grads_batched=True,
                                        retain_graph=b < count, allow_unused=True)
            rows.append(torch.cat([torch.zeros(b - a, p.numel(), dtype=p.dtype, device=self.device) if g is None
                                   else g.reshape(b - a, -1) for p, g in zip(leaves, grads, strict=True)], dim=1))
        return torch.cat(rows)


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads, restoring the caller's count after: CPU reductions
    split by thread, so a fixed count makes float results independent of the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
