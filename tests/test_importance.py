"""Importance scores of a small grokking transformer against an independent computation.

The independent side uses nothing of the decomposition engine: the recorded parameters are
copied into the task's own ``nn.Module``, ``∇g`` comes from ``torch.autograd.grad`` on it, the
path integral of every step is cut where a ReLU pre-activation crosses zero (found by
bisection) and each smooth piece integrated by Gauss–Legendre, and the weight-decay part of
AdamW's update is its closed form ``ψ_s(reg) = −α λ θ_s``. Every score is compared element by
element in the model's own parameter shapes, so a permutation of elements, the wrong test
examples, the wrong outputs or the wrong part of the update shows; so does a pruning mask
that keeps other elements than the top of the independent ranking.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import store
from engine.analysis.prune import keep_masks, load_setup
from engine.decompose import ExplainConfig, explain_history
from engine.run.history import History
from engine.tasks import get_task, train_task

CONFIG = {"p": 7, "train_frac": 0.5, "d_model": 8, "n_heads": 2, "d_mlp": 16, "steps": 6, "lr": 1e-2,
          "weight_decay": 1.0}
TEST_IDS = (1, 4, 6, 9)  # validation examples, not the first ones and not contiguous
NODES = 4  # Gauss–Legendre nodes per smooth piece of a step
GRID = 16  # panels searched for sign changes of the ReLU pre-activations along a step
COLUMNS = ("importance", "gradient", "decay", "balance", "taylor", "magnitude")

Point = dict[str, torch.Tensor]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The module's fixtures do the work: keep them to one thread as the per-test fixture does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> History:
    return History.open(train_task("modular-addition", tmp_path_factory.mktemp("imp") / "run", CONFIG,
                                   progress=False))


def quantity(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``g`` of one example ``(O,)``, written out independently of ``engine.model.outputs``."""
    if name == "logits":
        return logits[0]
    return F.log_softmax(logits, dim=-1)[0, labels[:1]]


def load(model: torch.nn.Module, point: Point) -> None:
    with torch.no_grad():
        for tensor, parameter in model.named_parameters():
            parameter.copy_(point[tensor])


def gradient(model: torch.nn.Module, point: Point, x: torch.Tensor, y: torch.Tensor, name: str) -> Point:
    """``∂g_j(x)/∂θ`` of one example at ``point``: ``{tensor: (O, *shape)}``, one backward pass per output."""
    load(model, point)
    g = quantity(name, model(x), y)  # (O,)
    rows = torch.autograd.grad(g, list(model.parameters()), torch.eye(len(g), dtype=g.dtype), is_grads_batched=True)
    return dict(zip((tensor for tensor, _ in model.named_parameters()), rows, strict=True))


def preactivation(model: torch.nn.Module, point: Point, x: torch.Tensor) -> torch.Tensor:
    """The MLP's ReLU input ``(d_mlp,)`` for one example at ``point``."""
    load(model, point)
    seen = []
    handle = model.mlp.fc_in.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def kinks(model: torch.nn.Module, theta: Point, delta: Point, x: torch.Tensor) -> list[float]:
    """Where a ReLU pre-activation crosses zero on ``θ + tΔ``, ``t ∈ (0, 1)``: grid, then bisection."""
    def at(t: float) -> torch.Tensor:
        return preactivation(model, {k: theta[k] + t * delta[k] for k in theta}, x)

    grid = np.linspace(0.0, 1.0, GRID + 1)
    values = torch.stack([at(t) for t in grid])  # (GRID + 1, d_mlp)
    out = []
    for panel, unit in (values[:-1] * values[1:] < 0).nonzero().tolist():
        lo, hi = grid[panel], grid[panel + 1]
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(at(mid)[unit] * values[panel, unit]) > 0 else (lo, mid)
        out.append((lo + hi) / 2)
    return sorted(out)


def independent_scores(history: History, name: str) -> dict[str, dict[str, np.ndarray]]:
    """Every importance column per tensor, in the tensor's shape, summed over ``TEST_IDS``."""
    task = get_task(history.model_spec)
    model = task.build_model().double()
    val = task.dataset("val")
    names = [tensor for tensor, _ in model.named_parameters()]
    nodes, weights = np.polynomial.legendre.leggauss(NODES)
    lr, weight_decay = CONFIG["lr"], CONFIG["weight_decay"]
    final = {k: v.double() for k, v in history.params(history.num_steps).items()}
    scores = {k: {c: 0.0 for c in COLUMNS} for k in names}
    for example in TEST_IDS:
        x, y = val.inputs[example:example + 1], val.labels[example:example + 1]
        signed = {k: 0.0 for k in names}  # Σ_s φ_s ⊙ Δ_s, (O, *shape)
        decay = {k: 0.0 for k in names}   # Σ_s φ_s ⊙ ψ_s(reg)
        for step in range(history.num_steps):
            theta = {k: v.double() for k, v in history.params(step).items()}
            delta = {k: v.double() - theta[k] for k, v in history.params(step + 1).items()}
            ends = [0.0, *kinks(model, theta, delta, x), 1.0]
            phi = {k: 0.0 for k in names}
            for a, b in itertools.pairwise(ends):
                for node, weight in zip(a + (b - a) * (nodes + 1) / 2, (b - a) * weights / 2, strict=True):
                    grads = gradient(model, {k: theta[k] + node * delta[k] for k in names}, x, y, name)
                    phi = {k: phi[k] + weight * grads[k] for k in names}
            for k in names:
                signed[k] = signed[k] + phi[k] * delta[k]
                decay[k] = decay[k] + phi[k] * (-lr * weight_decay * theta[k])
        at_final = gradient(model, final, x, y, name)
        for k in names:
            grad_part, decay_part = (signed[k] - decay[k]).abs().sum(0), decay[k].abs().sum(0)
            for column, value in (("importance", signed[k].abs().sum(0)), ("gradient", grad_part),
                                  ("decay", decay_part), ("balance", grad_part - decay_part),
                                  ("taylor", (final[k] * at_final[k]).abs().sum(0))):
                scores[k][column] = scores[k][column] + value
    for k in names:
        scores[k]["magnitude"] = final[k].abs()
    return {k: {c: v.numpy() for c, v in columns.items()} for k, columns in scores.items()}


def stored_scores(db_path, history: History) -> dict[str, dict[str, np.ndarray]]:
    """The importance view read back from the database, each column shaped like its tensor."""
    with store.RunDB.open(db_path) as db:
        frame = db.importance()
    out = {}
    for tensor in history.param_names:
        rows = frame.filter(frame["tensor"] == tensor).sort("index")
        assert rows["index"].to_list() == list(range(rows.height))
        out[tensor] = {c: rows[c].to_numpy().reshape(history.param_shapes[tensor]) for c in COLUMNS}
    return out


@pytest.fixture(scope="module", params=["logprob", "logits"])
def explained(request, run, tmp_path_factory):
    """(quantity, database, independent scores): the engine's scores stored, the truth computed apart."""
    task = get_task(run.model_spec)
    config = ExplainConfig(views=("importance",), test_ids=TEST_IDS, quantity=request.param, dtype="float64",
                           device="cpu")
    path = store.write_run(tmp_path_factory.mktemp("db") / f"{request.param}.duckdb",
                           explain_history(run, task, config, progress=False).to_bundle(run, task))
    return request.param, path, independent_scores(run, request.param)


def test_every_stored_score_matches_the_independent_computation_element_by_element(run, explained):
    _, path, truth = explained
    stored = stored_scores(path, run)
    for tensor, columns in truth.items():
        for column, expected in columns.items():
            scale = np.abs(expected).max()
            np.testing.assert_allclose(stored[tensor][column], expected, rtol=1e-9, atol=1e-12 * scale,
                                       err_msg=f"{column} of {tensor}")


def test_the_decay_part_is_not_negligible_so_the_parts_are_told_apart(run, explained):
    _, _, truth = explained
    for tensor, columns in truth.items():
        assert columns["decay"].max() > 0.01 * columns["importance"].max(), tensor
        assert not np.allclose(columns["gradient"], columns["importance"], rtol=1e-3), tensor


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_pruning_keeps_the_top_of_the_independent_ranking(run, explained, scope):
    _, path, truth = explained
    setup = load_setup(path, min_eval=5)
    assert setup.ranking_ids.tolist() == list(TEST_IDS)
    methods = {"kernel": "importance", "kernel-gradient": "gradient", "kernel-decay": "decay",
               "kernel-balance": "balance", "taylor": "taylor", "magnitude": "magnitude"}
    for method, column in methods.items():
        for sparsity in (0.3, 0.7, 0.95):
            masks = keep_masks(setup.scores(method), sparsity, scope, order=setup.prunable)
            pruned = setup.pruned(method, sparsity, scope)
            groups = [setup.prunable] if scope == "global" else [[n] for n in setup.prunable]
            for names in groups:
                score = np.concatenate([truth[n][column].ravel() for n in names])
                keep = len(score) - int(np.floor(sparsity * len(score) + 0.5))
                expected = np.zeros(len(score), dtype=bool)
                expected[np.argsort(-score, kind="stable")[:keep]] = True
                got = np.concatenate([masks[n].numpy().ravel() for n in names])
                np.testing.assert_array_equal(got, expected, err_msg=f"{method} {scope} {sparsity}")
                for n in names:
                    final = setup.params[n]
                    assert torch.equal(pruned[n], torch.where(masks[n], final, torch.zeros_like(final)))
            for n in setup.output:
                assert torch.equal(pruned[n], setup.params[n])
