"""Figure builders (app/charts.py) and the phase rule (app/phases.py) on small hand-made frames."""

import math

import numpy as np
import plotly.graph_objects as go
import polars as pl
import pytest

from app import charts
from app.charts import Style
from app.phases import Phase, find_phases, reach_and_hold

STYLE = Style()


@pytest.fixture(autouse=True)
def _validated_figures(monkeypatch):
    """The dashboard builds figures without plotly's validation (for speed); here every
    figure a builder returns is validated, so a misspelt property fails its test."""
    build = charts._figure

    def validated(*args, **kwargs):
        fig = build(*args, **kwargs)
        go.Figure(fig.to_plotly_json())  # raises ValueError on an invalid property or value
        return fig

    monkeypatch.setattr(charts, "_figure", validated)


def steps_frame(n: int = 100, fit: int = 20, grok: int = 70) -> pl.DataFrame:
    """A grokking-shaped run: train accuracy 1.0 from ``fit``, validation 1.0 from ``grok``."""
    step = np.arange(n)
    train_acc = np.where(step >= fit, 1.0, step / fit * 0.9)
    val_acc = np.where(step >= grok, 1.0, 0.05)
    return pl.DataFrame(
        {
            "step": step,
            "lr": np.full(n, 1e-3),
            "weight_decay": np.full(n, 1.0),
            "train_loss": np.exp(-step / 10) + 1e-3,
            "val_loss": np.where(step >= grok, 0.01, 4.0),
            "train_acc": train_acc,
            "val_acc": val_acc,
            "update_norm": np.full(n, 0.01),
            "param_norm": 10 + step / 10,
            "loss_change": np.full(n, -0.01),
        }
    )


def matrix_frame() -> pl.DataFrame:
    """component_matrix output: 2 windows of 10 steps × 3 layers (one cell missing)."""
    return pl.DataFrame(
        {
            "step_lo": [0, 0, 0, 10, 10],
            "step_hi": [10, 10, 10, 20, 20],
            "group": ["embed", "mlp", "unembed", "embed", "unembed"],
            "value": [0.5, -2.0, 1.0, 0.25, -0.5],
            "decay": [0.1, -0.2, 0.0, 0.05, -0.1],
        }
    )


ORDER = ["embed", "attn", "mlp", "unembed"]


# ── phases ──────────────────────────────────────────────────────────────────────────


def test_phases_of_a_grokking_run_follow_the_documented_thresholds():
    phases = find_phases(steps_frame(fit=20, grok=70))
    assert phases == [
        Phase("memorization", 0, 20),
        Phase("circuit formation", 20, 70),
        Phase("clean-up", 70, 99),
    ]


def test_phases_when_validation_never_generalizes():
    frame = steps_frame().with_columns(val_acc=pl.lit(0.1))
    assert find_phases(frame) == [Phase("memorization", 0, 20), Phase("circuit formation", 20, 99)]


def test_phases_when_training_never_fits_is_all_memorization():
    frame = steps_frame().with_columns(train_acc=pl.lit(0.5), val_acc=pl.lit(0.1))
    assert find_phases(frame) == [Phase("memorization", 0, 99)]


def test_phases_without_circuit_formation_when_fit_and_generalization_coincide():
    assert find_phases(steps_frame(fit=30, grok=10)) == [Phase("memorization", 0, 30), Phase("clean-up", 30, 99)]


def test_phases_need_accuracy_columns_with_values():
    assert find_phases(steps_frame().drop("val_acc")) == []
    nulls = steps_frame().with_columns(train_acc=pl.lit(None, pl.Float64), val_acc=pl.lit(None, pl.Float64))
    assert find_phases(nulls) == []
    assert find_phases(steps_frame().head(0)) == []


def test_reach_and_hold_ignores_a_spike_and_tolerates_a_dip():
    steps = np.arange(100)
    values = np.zeros(100)
    values[10] = 1.0  # a spike long before the real rise
    values[50:] = 1.0
    values[80] = 0.0  # one dip after the rise
    assert reach_and_hold(steps, values, 0.9) == 50
    assert reach_and_hold(steps, np.full(100, np.nan), 0.9) is None
    values[80] = 1.0
    sparse = np.where(steps % 10 == 0, values, np.nan)  # metric logged every 10 steps
    assert reach_and_hold(steps, sparse, 0.9) == 50


# ── colours and style ───────────────────────────────────────────────────────────────


def test_group_colors_follow_model_order_and_cycle():
    colors = charts.group_colors(["b", "a", "b", *[f"g{i}" for i in range(30)]])
    assert colors["b"] == charts.PALETTE[0] and colors["a"] == charts.PALETTE[1]
    assert colors["g18"] == charts.PALETTE[0]  # 21st distinct name wraps around
    assert charts.group_colors(["a"]) == {"a": charts.PALETTE[0]}


def test_group_order_uses_position_and_deduplicates():
    groups = pl.DataFrame(
        {
            "tensor": ["unembed.weight", "embed.weight", "mlp.w", "mlp.b"],
            "module": ["unembed", "embed", "mlp", "mlp"],
            "layer": ["unembed", "embed", "mlp", "mlp"],
            "size": [10, 10, 4, 2],
            "position": [3, 0, 1, 2],
        }
    )
    assert charts.group_order(groups, "layer") == ["embed", "mlp", "unembed"]
    assert charts.group_order(groups, "tensor") == ["embed.weight", "mlp.w", "mlp.b", "unembed.weight"]


def test_presentation_style_is_larger_and_light():
    normal, present = Style(dark=True), Style(presentation=True, dark=True)
    assert present.font_size > normal.font_size and present.height(500) > normal.height(500)
    assert normal.template["layout"]["paper_bgcolor"] == "#0E1117"
    assert present.template["layout"]["paper_bgcolor"] == "white"
    # x tick labels stand below the lowest y label's lower half at either font size
    assert present.template["layout"]["xaxis"]["ticklabelstandoff"] > present.font_size / 2
    config = present.image_config("run-curves", "svg")
    assert config["toImageButtonOptions"] == {"format": "svg", "filename": "run-curves", "scale": 3}
    fig = charts.training_curves(steps_frame(), [], present)
    assert fig.layout.font.size == 20 and fig.layout.template.layout.paper_bgcolor == "white"


# ── overview ────────────────────────────────────────────────────────────────────────


def test_training_curves_traces_axes_and_phase_shading():
    frame = steps_frame()
    phases = find_phases(frame)
    fig = charts.training_curves(frame, phases, STYLE)
    assert [t.name for t in fig.data] == ["train", "validation", "train", "validation"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.title.text == "loss (nats)"
    assert fig.layout.yaxis2.title.text == "accuracy"
    assert fig.layout.xaxis2.title.text == "training step"
    assert list(fig.data[2].y) == frame["train_acc"].to_list()
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) >= len(phases) and {(r.x0, r.x1) for r in rects} == {(p.start, p.end) for p in phases}
    assert {a.text for a in fig.layout.annotations} == {"memorization", "circuit formation", "clean-up"}


def test_training_curves_drop_unlogged_values_and_support_log_steps():
    frame = steps_frame(10).with_columns(
        val_loss=pl.when(pl.col("step") % 5 == 0).then(pl.col("val_loss")).otherwise(None)
    )
    fig = charts.training_curves(frame, [Phase("memorization", 0, 9)], STYLE, log_x=True)
    assert list(fig.data[1].x) == [0, 5]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.title.text == "training step (log scale)"
    assert math.isclose(fig.layout.annotations[0].x, math.log10(3.0))  # geometric middle of [1, 9]


def test_optimizer_curves_rows():
    steps = steps_frame().with_columns(lr=np.linspace(0, 1e-3, 100), update_norm=np.geomspace(0.3, 0.05, 100))
    fig = charts.optimizer_curves(steps, [], STYLE)
    assert [t.name for t in fig.data] == ["parameter norm", "update norm", "learning rate"]
    assert fig.layout.yaxis.title.text == "‖θ‖ (L2)" and fig.layout.yaxis2.type == "log"
    assert fig.layout.yaxis3.title.text == "learning rate"
    assert fig.data[0].y[-1] == pytest.approx(10 + 99 / 10)
    # less than a decade of ‖Δθ‖: labelled at 1-2-5 steps, not at every digit
    assert list(fig.layout.yaxis2.tickvals) == pytest.approx([0.05, 0.1, 0.2])


def test_a_constant_learning_rate_is_stated_not_drawn():
    fig = charts.optimizer_curves(steps_frame(), [], STYLE)
    assert [t.name for t in fig.data] == ["parameter norm", "update norm"]
    assert "learning rate 0.001 at every step" in fig.layout.title.text
    assert charts.constant_value(steps_frame(), "lr") == 1e-3
    assert charts.constant_value(steps_frame(), "param_norm") is None


@pytest.mark.parametrize(
    ("values", "ticks"),
    [
        ([0.012, 0.5], [0.02, 0.05, 0.1, 0.2, 0.5]),      # under two decades: 1-2-5
        ([3e-9, 2e-4], [1e-8, 1e-7, 1e-6, 1e-5, 1e-4]),   # decades
        ([1e-12, 1.0], [1e-12, 1e-9, 1e-6, 1e-3, 1.0]),   # every third decade: at most 6 ticks
        ([0.31, 0.42], [0.35, 0.4]),                      # inside one 1-2-5 step: round numbers
    ],
)  # fmt: skip
def test_log_ticks_never_crowd(values, ticks):
    out = charts.log_ticks(values)
    assert out["tickvals"] == pytest.approx(ticks)
    assert len(out["ticktext"]) == len(ticks) <= charts.MOST_TICKS
    assert charts.log_ticks([0.0, -1.0, float("nan")]) == {}


def test_run_card_formats_meta_and_marks_missing_fields():
    meta = {
        "task": "modular-addition",
        "model_spec": {"task": "modular-addition", "config": {"p": 113, "d_model": 64}},
        "model_summary": {"parameters": 226_560, "tensors": 12},
        "optimizer": {"class": "AdamW", "family": "adam", "groups": [{"lr": 0.001, "betas": [0.9, 0.98]}]},
        "quantity": "logits",
        "quadrature": {"rule": "gauss-legendre", "nodes": 4},
        "max_rel_residual": 3.2e-7,
        "steps": 4000,
        "seconds": 300.0,
    }
    card = dict(charts.run_card(meta).iter_rows())
    assert card["task"] == "modular-addition"
    assert card["model size"] == "226,560 parameters in 12 tensors"
    assert card["optimizer"] == "AdamW (adam family)"
    assert card["optimizer hyper-parameters"] == "lr 0.001, betas (0.9, 0.98)"
    assert card["quadrature"] == "rule gauss-legendre, nodes 4"
    assert card["max relative residual"] == "3.2e-07"
    assert card["compute time"] == "5.0 min"
    assert card["gradient evaluations"] == charts.MISSING
    assert card["loss"] == "cross_entropy" and card["targets"] == charts.MISSING
    regression = dict(charts.run_card({"model_spec": {"model": "m:M", "loss": "mse"}, "targets": "float"}).iter_rows())
    assert regression["loss"] == "mse" and regression["targets"] == "floating-point (regression)"
    assert charts.run_card({})["value"].to_list().count(charts.MISSING) >= 10


def test_run_card_keeps_optimizer_and_training_settings_out_of_the_model_config():
    config = {"p": 97, "d_model": 64, "betas": [0.9, 0.98], "lr": 0.01, "weight_decay": 1.0, "steps": 1000, "seed": 0}
    card = dict(charts.run_card({"model_spec": {"config": config}, "data_fingerprint": "f" * 64}).iter_rows())
    assert card["model config"] == "p 97, d_model 64"
    assert card["training config"] == "steps 1,000, seed 0"
    assert card["data fingerprint"] == "f" * 64  # whole, not cut


def test_phase_table_bounds_are_inclusive_and_disjoint():
    phases = [Phase("memorization", 0, 20), Phase("circuit formation", 20, 70), Phase("clean-up", 70, 99)]
    table = charts.phase_table(phases)
    assert table["first step"].to_list() == [0, 20, 70] and table["last step"].to_list() == [19, 69, 99]
    assert table["steps"].sum() == 100  # every logged step 0…99 in exactly one phase


# ── components ──────────────────────────────────────────────────────────────────────


def test_component_heatmap_grid_order_and_signed_scale():
    fig = charts.component_heatmap(matrix_frame(), ORDER, "signed", "logit", STYLE)
    heat = fig.data[0]
    assert list(heat.y) == ["embed", "mlp", "unembed"]  # model order, absent groups dropped
    assert list(heat.x) == [4.5, 14.5]
    z = np.array(heat.z, dtype=float)
    assert z.shape == (3, 2) and z[0, 0] == 0.5 and z[1, 0] == -2.0 and np.isnan(z[1, 1])
    assert heat.zmid == 0 and heat.zmin == -2.0 and heat.zmax == 2.0
    assert heat.colorbar.title.text == "influence (Δ logit)"
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.xaxis.title.text == "training step (window centre)"


def test_component_heatmap_share_and_absolute_scales():
    share = charts.component_heatmap(matrix_frame().with_columns(pl.col("value").abs() / 3), ORDER, "share", "q", STYLE)
    assert share.data[0].zmin == 0 and share.data[0].zmax == 1
    assert share.data[0].colorbar.title.text == "share of |influence|"
    absolute = charts.component_heatmap(matrix_frame(), ORDER, "absolute", "q", STYLE)
    assert absolute.data[0].colorbar.title.text == "|influence| (Δ q)"


def test_component_lines_one_trace_per_group_with_palette_colours():
    colors = charts.group_colors(ORDER)
    fig = charts.component_lines(matrix_frame(), colors, ORDER, "signed", "logit", STYLE)
    assert [t.name for t in fig.data] == ["embed", "mlp", "unembed"]
    assert [t.line.color for t in fig.data] == [colors["embed"], colors["mlp"], colors["unembed"]]
    assert list(fig.data[2].y) == [1.0, -0.5]
    cumulative = charts.component_lines(matrix_frame(), colors, ORDER, "signed", "logit", STYLE, cumulative=True)
    assert list(cumulative.data[2].y) == [1.0, 0.5]
    assert cumulative.layout.yaxis.title.text == "cumulative influence (Δ logit)"


def test_decay_balance_splits_gradient_and_decay_parts():
    totals = pl.DataFrame(
        {
            "group": ["unembed", "embed"],
            "value": [1.0, 0.75],
            "decay": [-0.25, 0.25],
            "absolute": [1.5, 1.0],
            "share": [0.6, 0.4],
        }
    )
    fig = charts.decay_balance(totals, charts.group_colors(ORDER), ORDER, "logit", STYLE)
    gradient, decay, net = fig.data
    assert list(gradient.x) == ["embed", "unembed"]
    assert list(gradient.y) == [0.5, 1.25] and list(decay.y) == [0.25, -0.25] and list(net.y) == [0.75, 1.0]
    assert fig.layout.barmode == "relative" and fig.layout.yaxis.title.text == "influence (Δ logit)"


# ── data ────────────────────────────────────────────────────────────────────────────


def test_top_examples_bar_sorted_and_coloured_by_side():
    top = pl.DataFrame(
        {
            "train": [7, 3, -1, 9],
            "value": [0.9, 0.4, -0.2, -0.7],
            "label": [1, 2, None, 0],
            "text": ["1 + 0 = 1 (mod 5)", "2 + 0 = 2 (mod 5)", None, "a\nb"],
            "rank": [1, 2, 2, 1],
            "side": ["proponent", "proponent", "opponent", "opponent"],
        }
    )
    fig = charts.top_examples_bar(top, "logit", STYLE)
    bar = fig.data[0]
    assert list(bar.x) == [-0.7, -0.2, 0.4, 0.9]
    assert list(bar.y) == ["#9", "weight decay", "#3", "#7"]
    assert list(bar.marker.color) == [charts.SIDE_COLORS["opponent"]] * 2 + [charts.SIDE_COLORS["proponent"]] * 2
    assert bar.customdata[0] == "a<br>b"
    assert fig.layout.xaxis.title.text == "influence (Δ logit)"


def test_example_over_time_per_window_and_cumulative():
    frame = pl.DataFrame({"step_lo": [10, 0, 20], "step_hi": [20, 10, 30], "value": [2.0, 1.0, -0.5]})
    fig = charts.example_over_time(frame, 5, "logit", STYLE)
    assert list(fig.data[0].x) == [0, 10, 20] and list(fig.data[0].y) == [1.0, 2.0, -0.5]
    assert list(fig.data[1].y) == [1.0, 3.0, 2.5]
    assert fig.layout.title.text == "Influence of training example #5 over time"


def test_influence_histogram_counts_every_example_and_marks_the_regularizer():
    rng = np.random.default_rng(0)
    values = rng.normal(size=2000)
    dist = pl.DataFrame({"train": [-1, *range(2000)], "value": [0.3, *values.tolist()]})
    fig = charts.influence_histogram(dist, "logit", STYLE, bins=20)
    assert len(fig.data) == 1 and sum(fig.data[0].y) == 2000 and len(fig.data[0].x) == 20
    assert fig.layout.yaxis.type == "log"  # the centre bins hold ≥ 100 examples
    assert [s.x0 for s in fig.layout.shapes] == [0.3]
    assert fig.layout.title.text == "Distribution of influences (2,000 training examples)"
    few = charts.influence_histogram(dist.head(20), "logit", STYLE, bins=5)
    assert few.layout.yaxis.type != "log" and few.layout.yaxis.title.text == "training examples (count)"


# ── reconstruction ──────────────────────────────────────────────────────────────────


def completeness_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "step": [2, 0, 1],
            "true_change": [0.5, 1.0, -0.25],
            "reconstructed": [0.5, 0.9, -0.25],
            "quadrature_residual": [0.0, 0.1, 1e-9],
            "optimizer_residual": [None, 1e-7, 2e-7],
            "nodes": [2, 4, 3],
            "abs_residual": [0.0, 0.1, 1e-9],
        }
    )


def test_reconstruction_change_and_cumulative_error():
    fig = charts.reconstruction_change(completeness_frame(), "logit", STYLE)
    true, rec, error = fig.data
    assert list(true.x) == [0, 1, 2] and list(true.y) == [1.0, -0.25, 0.5]
    assert list(rec.y) == [0.9, -0.25, 0.5]
    assert error.y == pytest.approx([0.1, 0.1, 0.1])
    assert fig.layout.yaxis.title.text == "Δ logit per step"


def test_residual_figure_uses_log_scale_without_zeros():
    fig = charts.residual_figure(completeness_frame(), "logit", STYLE)
    quad, opt, nodes = fig.data
    assert quad.y[0] == pytest.approx(0.1) and quad.y[1] == pytest.approx(1e-9) and math.isnan(quad.y[2])
    assert math.isnan(opt.y[2]) and opt.y[1] == pytest.approx(2e-7)
    assert list(nodes.y) == [4, 3, 2] and nodes.line.shape == "hv"
    assert fig.layout.yaxis.type == "log"


def test_exactness_figure_one_bar_per_quadrature():
    exactness = pl.DataFrame(
        {
            "quadrature": ["midpoint-10", "gauss-legendre-4"],
            "agreement": [0.75, 1.0],
            "kl": [0.88, 1e-9],
            "gradient_evaluations": [40_000, 16_000],
            "max_rel_residual": [0.1, 1e-7],
        }
    )
    fig = charts.exactness_figure(exactness, STYLE)
    assert list(fig.data[0].x) == ["midpoint-10", "gauss-legendre-4"] and list(fig.data[0].y) == [0.75, 1.0]
    assert list(fig.data[1].y) == [0.88, 1e-9] and list(fig.data[1].customdata) == [40_000, 16_000]
    assert fig.layout.yaxis.title.text == "agreement" and fig.layout.yaxis2.title.text == "KL (nats)"


# ── pruning and comparison ──────────────────────────────────────────────────────────


def pruning_rows(methods=("kernel", "magnitude", "random"), sparsities=(0.1, 0.5, 0.9, 0.99, 0.999)) -> pl.DataFrame:
    rows = [("dense", 0.0, -1, 1.0)]
    for sparsity in sparsities:
        for k, method in enumerate(methods):
            seeds = range(3) if method == "random" else (-1,)
            rows += [(method, sparsity, seed, 0.9 - sparsity / 2 - k / 10 + 0.05 * max(seed, 0)) for seed in seeds]
    return pl.DataFrame(rows, schema=["method", "sparsity", "seed", "agreement"], orient="row").with_columns(
        scope=pl.lit("global"), accuracy=pl.col("agreement") * 0.9, kl=1 - pl.col("agreement"),
        achieved_sparsity=pl.col("sparsity"),
    )  # fmt: skip


def test_pruning_figure_means_over_seeds_with_band_only_for_varying_methods():
    fig = charts.pruning_figure(pruning_rows(), STYLE)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(lines) == 9 and len(bands) == 3  # 3 panels × 3 methods; a band for random only
    assert fig.data.index(bands[0]) < fig.data.index(lines[0])  # bands under every curve
    random_agreement = next(t for t in lines if t.legendgroup == "random" and t.xaxis == "x")
    assert random_agreement.y == pytest.approx([0.9 - s / 2 - 0.2 + 0.05 for s in (0.1, 0.5, 0.9, 0.99, 0.999)])
    assert random_agreement.x == pytest.approx(charts.sparsity_position([0.1, 0.5, 0.9, 0.99, 0.999]))
    assert random_agreement.name.startswith("random (mean of 3 seeds")
    first_panel = [t.legendgroup for t in lines if t.xaxis == "x"]
    assert first_panel == ["random", "magnitude", "kernel"]  # kernel drawn last, on top
    assert len({(t.marker.symbol, t.line.dash) for t in lines}) == 3  # distinct marks
    dense = [t for t in fig.data if t.legendgroup == "dense"]
    assert [list(t.y) for t in dense] == [[1.0, 1.0], [0.9, 0.9], [0.0, 0.0]]  # the reference in every panel
    assert list(fig.layout.xaxis.ticktext) == ["10%", "50%", "90%", "99%", "99.9%"]
    assert fig.layout.yaxis3.title.text == "KL (nats)"


def test_pruning_figure_is_generic_over_methods():
    methods = ("kernel", "kernel_abs", "fisher", "random")
    fig = charts.pruning_figure(pruning_rows(methods).filter(pl.col("method") != "dense"), STYLE)
    lines = [t for t in fig.data if t.mode == "lines+markers" and t.xaxis == "x"]
    assert {t.legendgroup for t in lines} == set(methods)
    assert len({(t.marker.symbol, t.line.dash, t.line.color) for t in lines}) == 4
    assert any(t.name == "kernel abs" for t in lines)
    # no dense row stored: agreement 100 % and KL 0 hold by definition; accuracy is unknown
    dense = [t for t in fig.data if t.legendgroup == "dense"]
    assert [(t.xaxis, list(t.y)) for t in dense] == [("x", [1.0, 1.0]), ("x3", [0.0, 0.0])]


def test_pruning_table_means_without_sentinels():
    table = charts.pruning_table(pruning_rows())
    assert "seed" not in table.columns and -1 not in table["seeds"].to_list()
    assert table["method"].to_list()[:2] == ["dense model", "kernel importance Ψ̄"]
    random = table.filter(pl.col("method") == "random", pl.col("sparsity") == 0.5).row(0, named=True)
    assert random["seeds"] == 3 and random["agreement"] == pytest.approx(0.9 - 0.25 - 0.2 + 0.05)


def test_compare_curves_overlay_runs_with_dashes():
    fig = charts.compare_curves([("a", steps_frame()), ("b", steps_frame(fit=5, grok=10))], STYLE)
    assert len(fig.data) == 8
    assert {t.line.dash for t in fig.data[:4]} == {"solid"} and {t.line.dash for t in fig.data[4:]} == {"dash"}
    assert fig.data[0].name == "a · train" and fig.data[5].name == "b · validation"


def test_compare_shares_grouped_bars_in_model_order():
    a = pl.DataFrame({"group": ["mlp", "embed"], "share": [0.75, 0.25]})
    b = pl.DataFrame({"group": ["embed", "unembed"], "share": [0.5, 0.5]})
    colors = charts.group_colors(ORDER)
    fig = charts.compare_shares([("a", a), ("b", b)], colors, ORDER, STYLE)
    assert [t.name for t in fig.data] == ["a", "b"]
    assert list(fig.data[0].x) == ["embed", "mlp", "unembed"]
    assert list(fig.data[0].y) == [0.25, 0.75, None] and list(fig.data[1].y) == [0.5, None, 0.5]
    assert fig.data[1].marker.pattern.shape == "/" and fig.data[0].marker.color[0] == colors["embed"]
