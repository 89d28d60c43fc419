"""Partitions finer than a tensor: heads, neurons, embedding rows, Fourier bases and user groups.

Their units must sum exactly to the components of the tensors they cover (MATH.md §8) — the
engine's own tensor components are the truth in float64 — and each unit's value must match an
independent computation: explicit element masks for groups, NumPy's FFT for the Fourier basis.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from engine.cli import main
from engine.decompose import ExplainConfig, explain_history
from engine.errors import BadInputError
from engine.model.groups import ParamLayout
from engine.model.task import get_task
from engine.model.units import (
    REST,
    Partition,
    TensorUnits,
    UnitMap,
    element_partition,
    fourier,
    fourier_basis,
    parse_index,
    partition_from_spec,
    resolve_partitions,
)
from engine.run.history import History
from engine.store import RunDB
from engine.tasks import ModularAdditionConfig, ModularAdditionTask, train_task

SMALL = ModularAdditionConfig(p=7, train_frac=0.5, d_model=8, n_heads=2, d_mlp=12, steps=6, lr=1e-2)
USER_SPEC = {"name": "halves", "units": {"first rows": {"attn.q.weight": "0:4"}, "last rows": {"attn.q.weight": "4:"}},
             "scope": ["attn.k.weight"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> History:
    from dataclasses import asdict

    return History.open(train_task("modular-addition", tmp_path_factory.mktemp("units") / "run", asdict(SMALL),
                                   progress=False))


@pytest.fixture(scope="module")
def layout() -> ParamLayout:
    model = ModularAdditionTask(SMALL).build_model()
    return ParamLayout.from_params(dict(model.named_parameters()))


# ---------------------------------------------------------------------------- the identity in the engine
@pytest.fixture(scope="module")
def explained(run):
    config = ExplainConfig(test_size=4, quantity="logprob", window=2, dtype="float64", partitions=("all", USER_SPEC))
    return explain_history(run, get_task(run.model_spec), config)


def test_units_sum_to_their_tensors_components_in_float64(explained):
    e = explained
    units = e.units.select("unit_id", "partition", "tensors")
    per = (e.unit_components.join(units, on="unit_id")
           .group_by("partition", "tensors", "step_lo", "test", "output")
           .agg(pl.col("value").sum(), pl.col("decay").sum()))
    assert set(per["partition"]) == {"heads", "neurons", "tokens", "embed-fourier", "unembed-fourier", "halves"}
    for partition, tensors in per.select("partition", "tensors").unique().iter_rows():
        ref = (e.components.filter(pl.col("tensor").is_in(tensors.split(",")))
               .group_by("step_lo", "test", "output").agg(pl.col("value").sum().alias("ref_value"),
                                                           pl.col("decay").sum().alias("ref_decay")))
        joined = per.filter(pl.col("partition") == partition).join(ref, on=["step_lo", "test", "output"])
        assert joined.height == ref.height == 3 * 4  # windows × tests × one output
        for column in ("value", "decay"):
            scale = float(joined[f"ref_{column}"].abs().max())
            assert scale > 0
            error = float((joined[column] - joined[f"ref_{column}"]).abs().max())
            assert error <= 1e-12 * scale, (partition, column, error / scale)


def test_units_with_the_other_tensors_reconstruct_the_total_change(explained):
    e = explained
    heads = e.units.filter(pl.col("partition") == "heads")
    attention = heads["tensors"][0].split(",")
    through_heads = (e.unit_components.filter(pl.col("unit_id").is_in(heads["unit_id"].implode()))
                     .group_by("test").agg(pl.col("value").sum()))
    others = e.components.filter(~pl.col("tensor").is_in(attention)).group_by("test").agg(
        pl.col("value").sum().alias("others"))
    change = e.completeness.group_by("test").agg(pl.col("true_change").sum(), pl.col("reconstructed").sum())
    total = through_heads.join(others, on="test").join(change, on="test")
    np.testing.assert_allclose(total["value"] + total["others"], total["reconstructed"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(total["value"] + total["others"], total["true_change"], rtol=1e-9, atol=1e-12)


def test_unit_labels_describe_the_partitions(explained):
    units = explained.units
    heads = units.filter(pl.col("partition") == "heads")
    assert heads["unit"].to_list() == ["head 0", "head 1"] and heads["layer"].unique().to_list() == ["attn"]
    neurons = units.filter(pl.col("partition") == "neurons")
    assert neurons["unit"].to_list()[-1] == REST and neurons.height == SMALL.d_mlp + 1
    assert neurons["size"].to_list()[-1] == SMALL.d_model  # the output bias belongs to no neuron
    fourier_units = units.filter(pl.col("partition") == "embed-fourier")
    assert fourier_units["unit"].to_list() == ["freq 0", "freq 1", "freq 2", "freq 3", "="]
    assert fourier_units["label"].to_list() == [0, 1, 2, 3, None]
    assert fourier_units["size"].to_list() == [8, 16, 16, 16, 8]
    assert units["unit_id"].to_list() == list(range(units.height))


def test_partitions_are_stored_and_read_back(explained, run, tmp_path):
    from engine.store import TestSelector, write_run

    bundle = explained.to_bundle(run, get_task(run.model_spec))
    with RunDB.open(write_run(tmp_path / "run.duckdb", bundle)) as db:
        totals = db.unit_totals("heads")
        direct = explained.unit_components.join(explained.units, on="unit_id").filter(
            pl.col("partition") == "heads").group_by("unit").agg(pl.col("value").sum()).sort("unit")
        np.testing.assert_allclose(totals.sort("unit")["value"], direct["value"], rtol=1e-12)
        assert db.partitions()["partition"].to_list() == explained.units["partition"].unique(
            maintain_order=True).to_list()
        with pytest.raises(BadInputError, match="not per class"):
            db.unit_totals("heads", tests=TestSelector("class", 1))


# ---------------------------------------------------------------------------- unit sums against independent truths
def test_fourier_units_match_numpys_fft():
    n, d = 9, 5
    layout = ParamLayout(("w", "other"), ((n, d), (3,)))
    partition = fourier("f", layout, {"w": {"axis": 0}})
    fine = UnitMap(layout, [partition])
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(2, 3, layout.total, generator=gen, dtype=torch.float64)
    v = torch.randn(layout.total, generator=gen, dtype=torch.float64)
    sums = fine.sums(phi, v).numpy()  # (freq, 2, 3)
    x = np.fft.fft(phi[..., : n * d].reshape(2, 3, n, d).numpy(), axis=2)
    y = np.fft.fft(v[: n * d].reshape(n, d).numpy(), axis=0)
    for f in range(n // 2 + 1):
        weight = 1 / n if f == 0 else 2 / n  # a frequency f > 0 holds the cosine and the sine row
        want = weight * np.real(x[:, :, f] * np.conj(y[f])).sum(-1)
        np.testing.assert_allclose(sums[f], want, rtol=1e-12, atol=1e-12)


def test_element_units_match_explicit_masks(layout):
    task = ModularAdditionTask(SMALL)
    partitions = [*list(task.partitions(layout).values())[:3], partition_from_spec(USER_SPEC, layout)]
    fine = UnitMap(layout, partitions)
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(2, 1, layout.total, generator=gen, dtype=torch.float64)
    v = torch.randn(layout.total, generator=gen, dtype=torch.float64)
    sums = fine.sums(phi, v)[:, :, 0].numpy()  # (U, 2)
    params = {n: np.arange(o, o + s).reshape(shape) for n, o, s, shape in
              zip(layout.names, layout.offsets, layout.sizes, layout.shapes, strict=True)}
    width = SMALL.d_model // SMALL.n_heads
    masks = {  # flat element positions of a few units, written out by hand
        ("heads", "head 1"): [params["attn.q.weight"][width:], params["attn.k.weight"][width:],
                              params["attn.v.weight"][width:], params["attn.o.weight"][:, width:]],
        ("neurons", "neuron 3"): [params["mlp.fc_in.weight"][3], params["mlp.fc_in.bias"][3:4],
                                  params["mlp.fc_out.weight"][:, 3]],
        ("neurons", REST): [params["mlp.fc_out.bias"]],
        ("tokens", "="): [params["embed.weight"][SMALL.p]],
        ("halves", "last rows"): [params["attn.q.weight"][4:]],
        ("halves", REST): [params["attn.k.weight"]],
    }
    units = fine.frame(pl.DataFrame({"tensor": list(layout.names), "module": list(layout.names),
                                     "layer": list(layout.names)}))
    for (partition, unit), parts in masks.items():
        row = units.filter((pl.col("partition") == partition) & (pl.col("unit") == unit))["unit_id"][0]
        index = np.concatenate([np.asarray(p).reshape(-1) for p in parts])
        want = (phi[:, 0, index] * v[index]).sum(-1).numpy()
        np.testing.assert_allclose(sums[row], want, rtol=1e-13, atol=1e-13)


def test_every_element_of_a_partitions_scope_is_in_exactly_one_unit(layout):
    for partition in ModularAdditionTask(SMALL).partitions(layout).values():
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        total = sum(math.prod(shapes[t]) for t in partition.tensors)
        assert int(partition.sizes().sum()) == total, partition.name
        assert (partition.sizes() > 0).all()


def test_fourier_basis_is_orthonormal_with_paired_frequencies():
    for n in (2, 7, 8, 97):
        q, freqs = fourier_basis(n)
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
        counts = np.bincount(freqs)
        assert counts[0] == 1 and (counts[1:(n + 1) // 2] == 2).all()
        if n % 2 == 0:
            assert counts[n // 2] == 1


# ---------------------------------------------------------------------------- contracts and errors
def test_index_expressions():
    assert parse_index("0:16, :", (32, 4), "x") == (slice(0, 16), slice(None))
    assert parse_index("-1", (5,), "x") == (-1,)
    assert parse_index("::2", (6,), "x") == (slice(None, None, 2),)
    assert parse_index("", (6,), "x") == ()


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "x", "units": {"a": {"ghost.weight": "0"}}}, "names 'ghost.weight', which is not a trainable tensor"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "0:4"}, "b": {"attn.q.weight": "3:6"}}}, "'b' overlaps"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "0:4, 0, 1"}}}, "has 3 axes, the tensor only 2"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "9"}}}, "index 9 is outside an axis of length 8"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "1:x"}}}, "is not an index such as"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "::0"}}}, "slice step of 0"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "0"}, "rest": {"attn.q.weight": "1"}}}, "rename that unit"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "0:0"}}}, "units without elements: a"),
    ({"name": "x", "units": {}}, "non-empty mapping of units"),
    ({"name": "x", "units": {"a": {"attn.q.weight": "0"}}, "colour": 1}, "unknown keys"),
    ({"name": "all", "units": {"a": {"attn.q.weight": "0"}}}, "other than 'all'"),
    ({"name": "x", "basis": "fourier", "tensors": {"embed.weight": {"axis": 2}}}, "is not an axis"),
    ({"name": "x", "basis": "fourier", "tensors": {"embed.weight": {"size": 99}}}, "must lie in 2"),
    ({"name": "x", "basis": "wavelet"}, "needs 'units'"),
    ("heads", "must be a dict with a 'name'"),
])
def test_bad_partition_specs_are_refused(layout, spec, message):
    with pytest.raises(BadInputError, match=message):
        partition_from_spec(spec, layout)


def test_unknown_and_duplicate_partitions_are_refused(layout):
    builtin = ModularAdditionTask(SMALL).partitions(layout)
    with pytest.raises(BadInputError, match=r"unknown partition 'layers'.*heads, neurons, tokens"):
        resolve_partitions(["layers"], builtin, layout)
    with pytest.raises(BadInputError, match="two partitions are named 'heads'"):
        resolve_partitions(["heads", {"name": "heads", "units": {"a": {"attn.q.weight": "0"}}}], builtin, layout)
    assert [p.name for p in resolve_partitions(["all", "heads"], builtin, layout)] == list(builtin)


def test_a_partition_checks_its_basis_units_and_labels(layout):
    base = fourier("f", layout, {"unembed.weight": {"axis": 0}})
    part = base.parts[0]
    with pytest.raises(BadInputError, match="not orthonormal"):
        Partition(base.name, base.kind, base.units, (TensorUnits(part.tensor, part.unit, 0, 2 * part.basis),),
                  base.labels)
    with pytest.raises(BadInputError, match="elements outside its units"):
        Partition("e", "groups", ("a",), (TensorUnits("attn.q.weight", np.ones((8, 8), np.int64)),), (0,))
    with pytest.raises(BadInputError, match="3 labels for 1 units"):
        element_partition("e", layout, {"a": {"attn.q.weight": ":"}}, labels=[7, 8, 9])


def test_partitions_need_reverse_mode_and_the_components_view(run):
    task = get_task(run.model_spec)
    with pytest.raises(BadInputError, match="partitions finer than a tensor needs full Jacobians"):
        explain_history(run, task, ExplainConfig(test_size=2, partitions=("heads",), engine="jvp"))
    with pytest.raises(BadInputError, match="add 'components' to the views"):
        ExplainConfig(views=("importance",), partitions=("heads",))
    with pytest.raises(BadInputError, match="unknown partition 'head'"):
        explain_history(run, task, ExplainConfig(test_size=2, partitions="head"))


def test_cli_explains_with_builtin_and_spec_partitions(run, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(USER_SPEC))
    out = tmp_path / "cli.duckdb"
    code = main(["explain", str(run.path), "--out", str(out), "--test", "val:2", "--quantity", "logprob",
                 "--partitions", "heads,embed-fourier", "--partition-spec", str(spec), "--json"])
    assert code == 0
    with RunDB.open(out) as db:
        assert db.partitions()["partition"].to_list() == ["heads", "embed-fourier", "halves"]
        assert db.meta()["partitions"] == ["heads", "embed-fourier", USER_SPEC]
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["explain", str(run.path), "--out", str(tmp_path / "x.duckdb"), "--partition-spec", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read the partition spec")
    assert not (tmp_path / "x.duckdb").exists()
