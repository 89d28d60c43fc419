"""Pruning by kernel importance Ψ̄ vs magnitude vs random (MATH.md §5) on tiny recorded runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from engine import store
from engine.analysis.prune import (
    COLUMNS,
    DENSE,
    METHODS,
    NO_SEED,
    STORED_SCORES,
    PruneConfig,
    add_arguments,
    cmd_prune,
    compare,
    keep_masks,
    load_setup,
    log_probs,
    output_tensors,
    prune,
    summarize,
)
from engine.errors import BadInputError, CorruptRunError, RunNotFoundError
from engine.run.history import History
from engine.run.record import Recorder
from engine.tasks import get_task
from tests.helpers import TinyMLP, tiny_data

N_VAL = 40
RANKING = tuple(range(8))  # validation ids the importance view is "explained" on
OTHER_SCORES = ("gradient", "decay", "balance", "taylor")  # importance columns besides Ψ̄ and the magnitude


def tiny_spec_val(n_val: int = N_VAL) -> dict:
    return {"model": "tests.helpers:TinyMLP", "model_kwargs": {}, "data": "tests.helpers:tiny_data",
            "data_kwargs": {"n_val": n_val}, "loss": "cross_entropy"}


def record(out: Path, lr: float = 0.3, steps: int = 8, init=None) -> Path:
    """Train TinyMLP with SGD on tiny_data(n_val=N_VAL); ``init`` may set the parameters first."""
    model = TinyMLP()
    if init is not None:
        with torch.no_grad():
            init(model)
    x, y = tiny_data(n_val=N_VAL)["train"]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    with Recorder(model, optimizer, out, model_spec=tiny_spec_val(), train_data=(x, y)) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:8]
            optimizer.zero_grad()
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            rec.batch(ids)
            optimizer.step()
    return out


def bundle(run: Path, importance: dict[str, np.ndarray] | None, ranking=RANKING, split: str = "val",
           run_dir: str | None = None, scores: dict[str, dict[str, np.ndarray]] | None = None) -> store.RunBundle:
    """A minimal run database for ``run``: its tensors, the ranking examples and an importance view whose
    Ψ̄ is ``importance`` and whose other score columns are ``scores`` (column → tensor → values) or null."""
    history = History.open(run)
    task = get_task(history.model_spec)
    final = history.params(history.num_steps)
    names = history.param_names
    n = history.num_steps
    steps = pl.DataFrame({"step": np.arange(n, dtype=np.int64), "lr": [0.3] * n, "weight_decay": [0.0] * n,
                          "update_norm": [0.0] * n, "param_norm": [1.0] * n}).with_columns(
        *[pl.lit(None, dtype=pl.Float64).alias(c) for c in ("train_loss", "val_loss", "train_acc", "val_acc",
                                                            "loss_change")])
    groups = pl.DataFrame({"tensor": names, "module": [t.rpartition(".")[0] for t in names],
                           "layer": [task.layer_of(t) for t in names],
                           "size": [final[t].numel() for t in names], "position": list(range(len(names)))})
    train, data = task.dataset("train"), task.dataset(split)
    examples = pl.DataFrame({
        "split": ["train"] * len(train) + ["test"] * len(ranking),
        "example": list(range(len(train))) + list(ranking),
        "label": train.labels.tolist() + data.labels[list(ranking)].tolist(),
        "text": [""] * (len(train) + len(ranking)),
    }).with_columns(pl.lit(None, dtype=pl.Int64).alias("predicted"), pl.lit(None, dtype=pl.Boolean).alias("correct"))
    completeness = pl.DataFrame({"step": [0] * len(ranking), "test": list(ranking), "output": [0] * len(ranking),
                                 "true_change": 0.0, "reconstructed": 0.0, "quadrature_residual": 0.0,
                                 "nodes": [1] * len(ranking)}).with_columns(
        pl.lit(None, dtype=pl.Float64).alias("optimizer_residual"))
    imp = None
    if importance is not None:
        scores = scores or {}
        imp = pl.concat([pl.DataFrame({"tensor": t, "index": np.arange(final[t].numel(), dtype=np.int64),
                                       "importance": np.asarray(v, dtype=np.float64).ravel(),
                                       **{c: (np.asarray(scores[c][t], dtype=np.float64).ravel() if c in scores
                                              else np.full(final[t].numel(), None)) for c in OTHER_SCORES},
                                       "magnitude": final[t].abs().double().numpy().ravel()},
                                      schema_overrides={c: pl.Float64 for c in OTHER_SCORES})
                         for t, v in importance.items()]).with_columns(pl.col(*OTHER_SCORES).fill_nan(None))
    meta = {"task": "imported", "steps": n, "quantity": "logits", "quadrature": "gauss:4",
            "data_fingerprint": history.manifest["data"]["fingerprint"], "test_split": split,
            "run_dir": str(run) if run_dir is None else run_dir, "model_spec": history.model_spec}
    return store.RunBundle(meta=meta, steps=steps, groups=groups, examples=examples, components=None, data=None,
                           importance=imp, completeness=completeness, predictions=None, exactness=None,
                           pruning=None)


def random_importance(run: Path, seed: int = 0) -> dict[str, np.ndarray]:
    history = History.open(run)
    rng = np.random.default_rng(seed)
    return {t: rng.random(int(np.prod(history.param_shapes[t]))) for t in history.param_names}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A trained tiny run and a database with a (random but fixed) importance view of it."""
    root = tmp_path_factory.mktemp("trained")
    run = record(root / "run")
    db = store.write_run(root / "run.duckdb", bundle(run, random_importance(run)))
    return run, db


def decoy_init(model: TinyMLP) -> None:
    """Hidden units 0–2 feed the output; units 3–5 are large-magnitude decoys the output ignores."""
    g = torch.Generator().manual_seed(3)
    model.hidden.weight[:3] = 0.5 * torch.randn(3, 4, generator=g).clamp(-1.9, 1.9)
    model.hidden.weight[3:] = 3.0
    model.hidden.bias[:3] = 0.1
    model.hidden.bias[3:] = 2.0
    model.out.weight[:, :3] = 2.0 * torch.randn(3, 3, generator=g)
    model.out.weight[:, 3:] = 0.0
    model.out.bias.zero_()


@pytest.fixture(scope="module")
def decoys(tmp_path_factory) -> Path:
    """A run whose final model uses only hidden units 0–2, with Ψ̄ = 1 on them and 0 on the decoys."""
    root = tmp_path_factory.mktemp("decoys")
    run = record(root / "run", lr=0.0, steps=2, init=decoy_init)
    useful = np.zeros((6, 4))
    useful[:3] = 1.0
    importance = {"hidden.weight": useful, "hidden.bias": np.array([1.0, 1, 1, 0, 0, 0])}
    return store.write_run(root / "run.duckdb", bundle(run, importance))


# ---------------------------------------------------------------------------- masks and sparsity
@pytest.mark.parametrize("scope", ["global", "per-tensor"])
@pytest.mark.parametrize("method", ["kernel", "magnitude", "random"])
def test_pruned_model_has_requested_zeros_and_untouched_output_layer(trained, scope, method):
    setup = load_setup(trained[1], trust_run=True)
    assert setup.output == ("out.weight", "out.bias") and setup.prunable == ("hidden.weight", "hidden.bias")
    total = sum(setup.params[n].numel() for n in setup.prunable)
    for sparsity in (0.3, 0.7, 0.95):
        pruned = setup.pruned(method, sparsity, scope, seed=1)
        zeros = {n: int((pruned[n] == 0).sum()) for n in setup.prunable}
        if scope == "global":
            assert abs(sum(zeros.values()) - sparsity * total) <= 0.5
        else:
            for n in setup.prunable:
                assert abs(zeros[n] - sparsity * setup.params[n].numel()) <= 0.5
        for n in setup.output:
            assert torch.equal(pruned[n], setup.params[n])
        kept = {n: pruned[n] != 0 for n in setup.prunable}
        for n in setup.prunable:
            assert torch.equal(pruned[n][kept[n]], setup.params[n][kept[n]])  # kept values unchanged


def test_frame_reports_achieved_sparsity_overall_and_per_layer(trained):
    frame = prune(trained[1], sparsities=(0.5, 0.9), methods=("kernel", "magnitude"), scope="per-tensor",
                  write=False, trust_run=True)
    assert frame.columns[: len(COLUMNS)] == list(COLUMNS)
    setup = load_setup(trained[1], trust_run=True)
    for row in frame.iter_rows(named=True):
        dense = row["method"] == DENSE
        pruned = setup.params if dense else setup.pruned(row["method"], row["sparsity"], "per-tensor")
        zeros = sum(int((pruned[n] == 0).sum()) for n in setup.prunable)
        assert row["achieved_sparsity"] == pytest.approx(zeros / 30)
        assert json.loads(row["layer_sparsity"]) == {"hidden": pytest.approx(zeros / 30)}


def test_global_keeps_highest_scores_and_breaks_ties_by_model_order():
    scores = {"a": torch.tensor([[0.5, 0.1], [0.9, 0.3]]), "b": torch.tensor([0.2, 0.8, 0.4])}
    masks = keep_masks(scores, 4 / 7, "global", order=["a", "b"])
    assert masks["a"].tolist() == [[True, False], [True, False]] and masks["b"].tolist() == [False, True, False]
    per_tensor = keep_masks(scores, 0.5, "per-tensor")  # a: remove 2 of 4; b: remove floor(1.5 + .5) = 2 of 3
    assert per_tensor["a"].tolist() == [[True, False], [True, False]] and per_tensor["b"].tolist() == [
        False, True, False]
    ties = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    first = keep_masks(ties, 3 / 7, "global", order=["a", "b"])
    assert first["a"].flatten().tolist() == [True, True, True, True] and first["b"].tolist() == [False] * 3
    assert all(torch.equal(first[n], keep_masks(ties, 3 / 7, "global", order=["a", "b"])[n]) for n in ties)


# ---------------------------------------------------------------------------- random baseline
def test_random_seeds_differ_and_reported_mean_is_mean_of_seeds(trained):
    setup = load_setup(trained[1], trust_run=True)
    masks = [setup.pruned("random", 0.7, "global", seed=s)["hidden.weight"] != 0 for s in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    frame = prune(trained[1], sparsities=(0.7,), methods=("kernel", "random"), seeds=3, write=False, trust_run=True)
    rows = frame.filter(pl.col("method") == "random").sort("seed")
    assert rows["seed"].to_list() == [0, 1, 2]
    assert frame.filter(pl.col("method") == "kernel")["seed"].to_list() == [NO_SEED]
    # independent evaluation of each seed's pruned model
    model = TinyMLP().eval()
    with torch.no_grad():
        reference = F.log_softmax(functional_call(model, setup.params, (setup.eval_inputs,)).double(), -1)
        per_seed = []
        for s in range(3):
            out = F.log_softmax(functional_call(model, setup.pruned("random", 0.7, "global", s),
                                                (setup.eval_inputs,)).double(), -1)
            per_seed.append([float((out.argmax(-1) == reference.argmax(-1)).double().mean()),
                             float(F.kl_div(out, reference, log_target=True, reduction="batchmean"))])
    assert rows["agreement"].to_list() == pytest.approx([a for a, _ in per_seed])
    assert rows["kl"].to_list() == pytest.approx([k for _, k in per_seed], rel=1e-6, abs=1e-12)
    mean = summarize(frame).filter(pl.col("method") == "random").row(0, named=True)
    assert mean["seeds"] == 3
    assert mean["agreement"] == pytest.approx(np.mean([a for a, _ in per_seed]))
    assert mean["kl"] == pytest.approx(np.mean([k for _, k in per_seed]), rel=1e-6)


# ---------------------------------------------------------------------------- evaluation set
def test_evaluation_set_never_overlaps_ranking_set(trained):
    setup = load_setup(trained[1], trust_run=True)
    assert setup.ranking_ids.tolist() == list(RANKING)
    assert set(setup.eval_ids.tolist()).isdisjoint(RANKING)
    assert sorted(setup.eval_ids.tolist() + list(RANKING)) == list(range(N_VAL))
    val = tiny_data(n_val=N_VAL)["val"]
    assert torch.equal(setup.eval_inputs, val[0][setup.eval_ids]) and torch.equal(setup.eval_labels,
                                                                                   val[1][setup.eval_ids])


def test_ranking_on_training_examples_evaluates_on_all_validation_examples(trained, tmp_path):
    run = trained[0]
    db = store.write_run(tmp_path / "train.duckdb", bundle(run, random_importance(run), ranking=(0, 5, 9),
                                                          split="train"))
    setup = load_setup(db, trust_run=True)
    assert setup.eval_ids.tolist() == list(range(N_VAL))


# ---------------------------------------------------------------------------- ranking by Ψ̄
def test_importance_ranking_keeps_the_parameters_that_matter(decoys):
    frame = prune(decoys, sparsities=(0.5,), write=False, trust_run=True)
    by = {(r["method"], r["seed"]): r for r in frame.iter_rows(named=True)}
    kernel = by[("kernel", NO_SEED)]
    assert kernel["agreement"] == 1.0 and kernel["kl"] == pytest.approx(0.0, abs=1e-12)
    assert kernel["achieved_sparsity"] == 0.5
    random_agreement = np.mean([by[("random", s)]["agreement"] for s in range(3)])
    assert random_agreement < 0.95
    assert by[("magnitude", NO_SEED)]["agreement"] < 0.95  # magnitude keeps the large decoys


# ---------------------------------------------------------------------------- measures
def test_kl_is_nonnegative_and_zero_when_nothing_is_pruned(trained):
    frame = prune(trained[1], sparsities=(1e-6, 0.5, 0.9, 0.999), write=False, trust_run=True)
    assert (frame["kl"] >= 0).all()
    tiny = frame.filter(pl.col("sparsity") == 1e-6)
    assert (tiny["kl"] == 0).all() and (tiny["agreement"] == 1).all() and (tiny["achieved_sparsity"] == 0).all()
    assert frame.filter(pl.col("sparsity") == 0.999)["kl"].min() > 0
    # the dense reference row: the unpruned model, evaluated as the sweep's rows are
    dense = frame.filter(pl.col("method") == DENSE).row(0, named=True)
    assert (dense["sparsity"], dense["seed"], dense["agreement"], dense["kl"]) == (0.0, NO_SEED, 1.0, 0.0)
    assert tiny["accuracy"].to_list() == [dense["accuracy"]] * tiny.height  # nothing pruned at 1e-6 either


def test_compare_matches_definitions():
    reference = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], dtype=torch.float64), -1)
    pruned = torch.log_softmax(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64), -1)
    result = compare(reference, pruned, torch.tensor([1, 0]))
    expected_kl = float((reference.exp() * (reference - pruned)).sum(-1).mean())
    assert result == {"agreement": 0.5, "accuracy": 0.5, "kl": pytest.approx(expected_kl)}
    assert compare(reference, reference, torch.tensor([0, 1]))["kl"] == 0.0


# ---------------------------------------------------------------------------- store round trip
def test_add_pruning_round_trip_keeps_other_scopes(trained, tmp_path):
    db = store.write_run(tmp_path / "rt.duckdb", bundle(trained[0], random_importance(trained[0])))
    first = prune(db, sparsities=(0.7, 0.9), seeds=2, trust_run=True)
    with store.RunDB.open(db) as reader:
        stored = reader.pruning()
    expected = first.select(COLUMNS).sort("method", "scope", "seed", "sparsity")
    assert stored.select(COLUMNS).equals(expected)
    second = prune(db, sparsities=(0.8,), methods=("kernel", "magnitude"), scope="per-tensor", trust_run=True)
    with store.RunDB.open(db) as reader:
        stored = reader.pruning()
        assert reader.views()["importance"] == 30 + 21  # the rest of the database is intact
    assert stored.height == first.height + second.height
    assert set(stored["scope"].to_list()) == {"global", "per-tensor"}
    # replaces global kernel rows only
    again = prune(db, sparsities=(0.5,), methods=("kernel",), scope="global", trust_run=True)
    with store.RunDB.open(db) as reader:
        stored = reader.pruning()
    kernel_global = stored.filter((pl.col("method") == "kernel") & (pl.col("scope") == "global"))
    assert kernel_global["sparsity"].to_list() == [0.5] and again["method"].to_list() == [DENSE, "kernel"]
    assert stored.filter(pl.col("method") == "random").height == 4


# ---------------------------------------------------------------------------- errors
def test_database_without_importance_view_names_the_explain_command(trained, tmp_path):
    db = store.write_run(tmp_path / "noimp.duckdb", bundle(trained[0], None))
    with pytest.raises(BadInputError, match=r"python -m engine explain .* --views importance"):
        prune(db, trust_run=True)


@pytest.mark.parametrize("sparsities", [(0.0,), (1.0,), (0.5, 1.5), (-0.1,), ()])
def test_sparsities_outside_open_unit_interval_are_refused(trained, sparsities):
    with pytest.raises(BadInputError, match="sparsit"):
        prune(trained[1], sparsities=sparsities, write=False, trust_run=True)


def test_bad_options_are_refused():
    with pytest.raises(BadInputError, match="unknown pruning method"):
        PruneConfig(methods=("gradient",))
    with pytest.raises(BadInputError, match="unknown pruning method"):
        PruneConfig(methods=())
    with pytest.raises(BadInputError, match="scope"):
        PruneConfig(scope="layer")
    with pytest.raises(BadInputError, match="seeds"):
        PruneConfig(seeds=0)


def test_missing_run_directory_is_named(trained, tmp_path):
    gone = tmp_path / "moved-away"
    db = store.write_run(tmp_path / "moved.duckdb", bundle(trained[0], random_importance(trained[0]),
                                                          run_dir=str(gone)))
    with pytest.raises(RunNotFoundError, match="moved-away"):
        prune(db, write=False, trust_run=True)
    frame = prune(db, sparsities=(0.5,), methods=("kernel",), run_dir=trained[0], write=False, trust_run=True)
    assert frame["method"].to_list() == ["dense", "kernel"]


def test_relative_run_directory_resolves_beside_the_database(trained, tmp_path):
    other = record(tmp_path / "runs" / "tiny")
    db = store.write_run(tmp_path / "beside.duckdb", bundle(other, random_importance(other), run_dir="runs/tiny"))
    assert load_setup(db, trust_run=True).run_dir == tmp_path / "runs" / "tiny"


def test_too_few_held_out_examples(trained, tmp_path):
    db = store.write_run(tmp_path / "all.duckdb", bundle(trained[0], random_importance(trained[0]),
                                                         ranking=tuple(range(30))))
    with pytest.raises(BadInputError, match="only 10 validation examples"):
        prune(db, write=False, trust_run=True)
    assert load_setup(db, min_eval=10, trust_run=True).eval_ids.tolist() == list(range(30, N_VAL))


def test_database_of_another_run_is_refused(trained, tmp_path):
    other = tmp_path / "other"
    record(other, steps=3)
    db = store.write_run(tmp_path / "mismatch.duckdb", bundle(trained[0], random_importance(trained[0]),
                                                             run_dir=str(other)))
    with pytest.raises(CorruptRunError, match="steps"):
        load_setup(db, trust_run=True)


def test_incomplete_importance_view_is_refused(trained, tmp_path):
    importance = random_importance(trained[0])
    del importance["hidden.bias"]
    db = store.write_run(tmp_path / "partial.duckdb", bundle(trained[0], importance))
    with pytest.raises(CorruptRunError, match=r"hidden\.bias"):
        load_setup(db, trust_run=True)


# ---------------------------------------------------------------------------- output layer
class _Reordered(nn.Module):
    """The output Linear is registered first; a parameter-free op follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.body = nn.Linear(3, 5)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) * 1.0


class _Direct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.aux = nn.Linear(5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.body(x)
        out = self.head(h)
        self.aux(h)  # runs last but does not produce the output
        return out


@dataclasses.dataclass
class _FakeTask:
    name: str = "fake"


@dataclasses.dataclass
class _HookTask:
    name: str = "hooked"

    def output_tensors(self):
        return ("body.weight",)


def test_output_layer_is_found_from_the_forward_pass():
    x = torch.randn(2, 3)
    recorded = ["head.weight", "head.bias", "body.weight", "body.bias"]
    assert output_tensors(_FakeTask(), _Reordered(), x, recorded) == ("head.weight", "head.bias")
    direct = [*recorded, "aux.weight", "aux.bias"]
    assert output_tensors(_FakeTask(), _Direct(), x, direct) == ("head.weight", "head.bias")
    assert output_tensors(_HookTask(), _Direct(), x, direct) == ("body.weight",)
    with pytest.raises(BadInputError, match="output_tensors"):
        output_tensors(_HookTask(), _Direct(), x, ["head.weight"])


def test_builtin_tasks_output_layers():
    for spec, expected in (({"task": "modular-addition", "config": {"p": 5}}, ("unembed.weight",)),
                           ({"task": "digits-cnn", "config": {}}, ("fc2.weight", "fc2.bias"))):
        task = get_task(spec)
        model = task.build_model().eval()
        names = [n for n, _ in model.named_parameters()]
        assert output_tensors(task, model, task.dataset("val").inputs[:2], names) == expected


# ---------------------------------------------------------------------------- command line and explain
def test_cmd_prune_arguments_and_json(trained, tmp_path):
    db = store.write_run(tmp_path / "cli.duckdb", bundle(trained[0], random_importance(trained[0])))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(db), "--sparsities", "0.5,0.9", "--methods", "kernel,magnitude,random", "--seeds",
                              "2", "--scope", "per-tensor", "--trust-run", "--json"])
    result = json.loads(json.dumps(cmd_prune(args)))
    assert result["rows"] == 1 + 2 * (1 + 1 + 2) and result["eval_examples"] == N_VAL - len(RANKING)
    assert result["output_layer"] == ["out.weight", "out.bias"] and result["prunable_parameters"] == 30
    assert result["curves"]["random @ 0.5"]["seeds"] == 2
    with store.RunDB.open(db) as reader:
        assert set(reader.pruning()["scope"].to_list()) == {"per-tensor"}
    with pytest.raises(BadInputError, match="sparsities"):
        cmd_prune(parser.parse_args([str(db), "--sparsities", "0.5,most"]))
    defaults = parser.parse_args([str(db)])
    assert defaults.sparsities == "0.1,0.3,0.5,0.7,0.8,0.9,0.95,0.99,0.999" and defaults.seeds == 3
    assert defaults.scope == "global" and defaults.methods == "all"
    everything = json.loads(json.dumps(cmd_prune(parser.parse_args([str(db), "--sparsities", "0.5", "--trust-run",
                                                                       "--json"]))))
    assert sorted({key.split(" @ ")[0] for key in everything["curves"]}) == ["dense", "kernel", "magnitude", "random"]


def test_prune_with_importance_from_explain(trained, tmp_path):
    from engine.decompose import ExplainConfig, explain

    run = trained[0]
    history = History.open(run)
    explanation = explain(run, ExplainConfig(views=("importance",), test_size=len(RANKING), device="cpu"),
                          progress=False, trust_run=True)
    db = store.write_run(tmp_path / "explained.duckdb",
                         explanation.to_bundle(history, get_task(history.model_spec)))
    setup = load_setup(db, trust_run=True)
    assert setup.ranking_ids.tolist() == list(RANKING)
    assert setup.methods == METHODS  # explain stores every score
    with store.RunDB.open(db) as reader:
        stored = reader.importance("hidden.weight")
    for method, column in STORED_SCORES.items():
        assert np.array_equal(setup.scores(method)["hidden.weight"].flatten().numpy(), stored[column].to_numpy())
    kept = setup.pruned("kernel", 0.7, "global")
    scores = torch.cat([setup.scores("kernel")[n].flatten() for n in setup.prunable])
    alive = torch.cat([(kept[n] != 0).flatten() for n in setup.prunable])
    assert scores[alive].min() >= scores[~alive].max()
    frame = prune(db, sparsities=(0.7,), write=False, trust_run=True)
    assert set(frame["method"]) == {DENSE, *METHODS}
    reference = log_probs(setup.model, setup.params, setup.eval_inputs, 16)
    assert frame.filter(pl.col("method") == "kernel")["agreement"].item() == compare(
        reference, log_probs(setup.model, kept, setup.eval_inputs, 16), setup.eval_labels)["agreement"]


# ---------------------------------------------------------------------------- importance variants
def variant_scores(run: Path) -> dict[str, dict[str, np.ndarray]]:
    """Distinct random scores for every column besides Ψ̄."""
    return {c: random_importance(run, seed=i + 1) for i, c in enumerate(OTHER_SCORES)}


def test_every_stored_variant_ranks_by_its_own_column(trained, tmp_path):
    run = trained[0]
    scores = variant_scores(run)
    db = store.write_run(tmp_path / "variants.duckdb", bundle(run, random_importance(run), scores=scores))
    setup = load_setup(db, trust_run=True)
    assert setup.methods == METHODS
    for method, column in STORED_SCORES.items():
        if column == "importance":
            continue
        for n in setup.prunable:
            np.testing.assert_array_equal(setup.scores(method)[n].numpy(), scores[column][n].reshape(
                setup.params[n].shape))
    frame = prune(db, sparsities=(0.3, 0.9), seeds=2, write=False, trust_run=True)
    assert frame.group_by("method").len().sort("method").rows() == sorted(
        [(DENSE, 1), *[(m, 2) for m in METHODS if m != "random"], ("random", 4)])
    masks = {m: setup.pruned(m, 0.3, "global")["hidden.weight"] != 0 for m in STORED_SCORES}
    assert len({tuple(mask.flatten().tolist()) for mask in masks.values()}) == len(STORED_SCORES)


def test_database_without_variant_scores_prunes_by_the_others_and_names_the_missing(trained, tmp_path):
    run = trained[0]
    db = store.write_run(tmp_path / "kernel-only.duckdb", bundle(run, random_importance(run)))
    assert load_setup(db, trust_run=True).methods == ("kernel", "magnitude", "random")
    frame = prune(db, sparsities=(0.5,), write=False, trust_run=True)
    assert set(frame["method"]) == {DENSE, "kernel", "magnitude", "random"}
    before = db.read_bytes()
    with pytest.raises(BadInputError, match=r"no taylor scores: .*`python -m engine explain .* --views importance"):
        prune(db, sparsities=(0.5,), methods=("kernel", "taylor"), trust_run=True)
    assert db.read_bytes() == before


def test_importance_view_with_scores_for_some_elements_only_is_refused(trained, tmp_path):
    run = trained[0]
    scores = variant_scores(run)
    scores["taylor"]["hidden.bias"] = np.full(6, None)
    db = store.write_run(tmp_path / "partial-taylor.duckdb", bundle(run, random_importance(run), scores=scores))
    with pytest.raises(CorruptRunError, match="taylor scores for some elements only"):
        load_setup(db, trust_run=True)
