"""Plotly figures and display tables built from the store's polars frames.

Every builder is a pure function: frames and options in, a ``plotly`` figure (or a
small polars table) out, with titled axes and units. Nothing here touches
streamlit or the database, so each builder is unit-tested on hand-made frames.

Figures are assembled as plain trace and layout dicts and wrapped in ``go.Figure`` without
validation (with a slim template): incremental ``update_*``/``add_vrect`` calls, the stock
templates and validation cost tens of milliseconds per figure, which a dashboard rerun
cannot afford. The tests validate every builder's output instead.

Colours are fixed: a group (layer, module or tensor) gets its colour from its
position in model order (``group_colors``), so a layer has the same colour on
every chart of a run and on both sides of a comparison of runs of one model.

Every chart with a step axis takes the run's ``phases`` and loss ``spikes`` and draws them
(bands, or boundary lines over a heatmap; dotted lines at spikes). A step window is drawn
over its span — heatmap cells from its first step to the next window's, lines as steps —
and named by its first and last step (``steps 800–819``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import plotly.graph_objects as go
import polars as pl

from app.phases import Phase

PALETTE = (
    "#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#EDC948", "#B07AA1", "#FF9DA7",
    "#9C755F", "#BAB0AC", "#1F77B4", "#D62728", "#2CA02C", "#9467BD", "#8C564B", "#E377C2",
    "#17BECF", "#BCBD22", "#7F7F7F", "#FF7F0E",
)  # fmt: skip
SPLIT_COLORS = {"train": "#4E79A7", "val": "#E15759"}
SIDE_COLORS = {"proponent": "#59A14F", "opponent": "#E15759"}
# Pruning methods: how each is named and drawn. A method not listed (a new importance
# variant) is named by ``method_label`` and drawn with the next unused colour and mark.
METHOD_LABELS = {
    "dense": "dense model",
    "kernel": "kernel importance Ψ̄",
    "magnitude": "magnitude |θ|",
    "random": "random",
}
METHOD_COLORS = {"kernel": "#4E79A7", "magnitude": "#F28E2B", "random": "#7F7F7F"}
METHOD_MARKS = {"kernel": ("circle", "solid"), "magnitude": ("square", "dash"), "random": ("diamond", "dot")}
EXTRA_MARKS = (("triangle-up", "dashdot"), ("x", "longdash"), ("star", "solid"), ("cross", "dash"),
               ("triangle-down", "dot"), ("hexagon", "longdashdot"))  # fmt: skip
DENSE = "dense"
PHASE_COLORS = {"memorization": "#F28E2B", "circuit formation": "#4E79A7", "clean-up": "#59A14F"}
SPIKE_COLOR = "#B5179E"
KEY_MARK = "★"  # prefixed to the labels of the final model's key frequencies
RUN_DASHES = ("solid", "dash")
MEASURE_TITLES = {
    "signed": "influence (Δ {q})",
    "absolute": "|influence| (Δ {q})",
    "share": "share of |influence|",
}
MISSING = "—"
LABEL_CHARS = 32  # longest example rendering used as a bar label
LOG_COUNTS_FROM = 100
SPARSITY_TICKS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 0.9999)
MOST_TICKS = 6  # most labelled ticks on an axis whose ticks this module places itself


@cache
def _template(background: str, text: str, grid: str, font_size: int) -> dict:
    """A slim template. Tick labels stand off their axes (x: below the lower half of the lowest
    y label; y: a few pixels left), so the first x label and the lowest y label never touch."""
    axis = {"gridcolor": grid, "linecolor": grid, "zerolinecolor": grid, "automargin": True, "ticks": ""}
    return {
        "layout": {
            "paper_bgcolor": background, "plot_bgcolor": background, "font": {"color": text},
            "colorway": list(PALETTE), "xaxis": {**axis, "ticklabelstandoff": round(0.7 * font_size)},
            "yaxis": {**axis, "ticklabelstandoff": 6}, "hoverlabel": {"align": "left"},
            "legend": {"bgcolor": "rgba(0,0,0,0)"},
        }
    }  # fmt: skip


LIGHT = ("white", "#1F2933", "#E5E9F0")
DARK = ("#0E1117", "#FAFAFA", "#31333F")


@dataclass(frozen=True)
class Style:
    """How figures look: normal screen use or projector-friendly presentation mode."""

    presentation: bool = False
    dark: bool = False

    @property
    def template(self) -> dict:
        return _template(*(DARK if self.dark and not self.presentation else LIGHT), self.font_size)

    @property
    def font_size(self) -> int:
        return 20 if self.presentation else 13

    @property
    def marker_size(self) -> int:
        return 12 if self.presentation else 8

    @property
    def line_width(self) -> float:
        return 3.5 if self.presentation else 2.0

    def height(self, base: int) -> int:
        return round(base * 1.3) if self.presentation else base

    def image_config(self, filename: str, fmt: str = "png") -> dict:
        """``st.plotly_chart`` config: the toolbar camera saves ``filename`` as PNG or SVG."""
        scale = 3 if self.presentation else 2
        return {
            "displaylogo": False,
            "toImageButtonOptions": {"format": fmt, "filename": filename, "scale": scale},
        }


def group_colors(groups: Iterable[str]) -> dict[str, str]:
    """A colour per group name, assigned from ``PALETTE`` in the given (model) order."""
    colors: dict[str, str] = {}
    for name in groups:
        if name not in colors:
            colors[name] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def group_order(groups: pl.DataFrame, level: str) -> list[str]:
    """Distinct ``level`` names ("layer", "module" or "tensor") in model order (by ``position``)."""
    if groups.height == 0:
        return []
    ordered = groups.sort("position").get_column(level).to_list()
    return list(dict.fromkeys(ordered))


def _ordered(present: Iterable[str], order: Sequence[str]) -> list[str]:
    """The ``present`` names in model ``order``, unknown names last (sorted)."""
    names = set(present)
    return [g for g in order if g in names] + sorted(names - set(order))


# ── layout plumbing ─────────────────────────────────────────────────────────────────


def _axis_id(k: int) -> str:
    return "" if k == 1 else str(k)


@dataclass(frozen=True)
class Grid:
    """Axes of a ``rows × cols`` grid of subplots: ``layout`` entries and the trace axis refs."""

    rows: int
    cols: int
    layout: dict

    def refs(self, row: int, col: int = 1) -> dict:
        k = (row - 1) * self.cols + col
        return {"xaxis": f"x{_axis_id(k)}", "yaxis": f"y{_axis_id(k)}"}

    def x(self, row: int, col: int = 1) -> dict:
        return self.layout[f"xaxis{_axis_id((row - 1) * self.cols + col)}"]

    def y(self, row: int, col: int = 1) -> dict:
        return self.layout[f"yaxis{_axis_id((row - 1) * self.cols + col)}"]


def grid(
    rows: int = 1,
    cols: int = 1,
    *,
    row_heights: Sequence[float] | None = None,
    v_space: float = 0.08,
    h_space: float = 0.08,
    shared_x: bool = False,
) -> Grid:
    """Axes for a grid; row 1 on top. ``shared_x`` links every x axis to the first one."""
    weights = np.asarray(row_heights if row_heights is not None else [1.0] * rows, dtype=float)
    heights = weights / weights.sum() * (1 - v_space * (rows - 1))
    width = (1 - h_space * (cols - 1)) / cols
    layout: dict = {}
    top = 1.0
    for row in range(1, rows + 1):
        bottom = max(top - heights[row - 1], 0.0)
        for col in range(1, cols + 1):
            k = (row - 1) * cols + col
            left = (col - 1) * (width + h_space)
            xaxis = {"domain": [left, min(left + width, 1.0)], "anchor": f"y{_axis_id(k)}"}
            if shared_x and k > 1:
                xaxis["matches"] = "x"
            if shared_x and row < rows:
                xaxis["showticklabels"] = False
            layout[f"xaxis{_axis_id(k)}"] = xaxis
            layout[f"yaxis{_axis_id(k)}"] = {"domain": [bottom, top], "anchor": f"x{_axis_id(k)}"}
        top = bottom - v_space
    return Grid(rows, cols, layout)


def _title(text: str) -> dict:
    return {"title": {"text": text}}


def _subplot_titles(g: Grid, titles: Sequence[str], style: Style) -> list[dict]:
    out = []
    for i, text in enumerate(titles):
        row, col = divmod(i, g.cols)
        x0, x1 = g.x(row + 1, col + 1)["domain"]
        out.append({
            "text": text, "x": (x0 + x1) / 2, "y": g.y(row + 1, col + 1)["domain"][1], "xref": "paper",
            "yref": "paper", "yanchor": "bottom", "showarrow": False, "font": {"size": style.font_size},
        })  # fmt: skip
    return out


def _figure(
    traces: list[dict], layout: dict, style: Style, title: str, height: int, legend: bool = True,
    notes: bool = False,
) -> go.Figure:
    """The assembled dicts as a figure, with the style's template, fonts and title.

    The title is aligned with the plotting area (not the figure edge). The top margin
    stacks, without overlap: the title, a one-line subtitle (the run and slice), the
    legend row and, with ``notes``, a row for labels drawn just above the plotting area
    (phase names, panel titles).
    """
    size = style.font_size
    header = 10 + 1.5 * (size + 4) + 1.5 * size  # title and subtitle, in pixels
    top = round(header + (1.8 * size if legend else 0) + (1.6 * size if notes else 0)) + 8
    full = {
        "template": style.template,
        "title": {"text": title, "x": 0.0, "xref": "paper", "xanchor": "left", "y": 1.0, "yref": "container",
                  "yanchor": "top", "pad": {"t": 10}, "font": {"size": size + 4}},
        "font": {"size": size},
        "height": style.height(height),
        "margin": {"l": 70, "r": 30, "t": top, "b": 60},
        "showlegend": legend,
        "legend": {"orientation": "h", "yref": "container", "yanchor": "top", "y": 1 - header / style.height(height),
                   "xanchor": "left", "x": 0.0},
        **layout,
    }  # fmt: skip
    return go.Figure(data=traces, layout=full, _validate=False)


def log_ticks(values: Iterable[float], most: int = MOST_TICKS) -> dict:
    """``tickvals``/``ticktext`` for a log axis over ``values`` that never crowd.

    Plotly's own log ticks label the digits 2…9 of a short range ("1 9 8 7 …" on top of
    each other); here: whole decades (every n-th, at most ``most``), else 1-2-5 steps,
    else, on a range shorter than a factor 2.5, evenly spaced round numbers.
    """
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return {}
    lo, hi = float(v.min()), float(v.max())
    decades = [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    inside = [t for t in decades if lo / 1.0001 <= t <= hi * 1.0001]
    if len(inside) >= 3:
        stride = math.ceil(len(inside) / most)
        ticks = inside[::-1][::stride][::-1]
    else:
        ticks = [m * d for d in decades for m in (1, 2, 5) if lo / 1.0001 <= m * d <= hi * 1.0001]
        if len(ticks) < 2:
            step = _nice_step((hi - lo) / 3) if hi > lo else abs(lo) or 1.0
            ticks = [t for t in np.arange(math.ceil(lo / step) * step, hi * 1.0001, step) if t > 0] or [lo]
    return {"tickvals": ticks, "ticktext": [_short_number(t) for t in ticks]}


def _nice_step(raw: float) -> float:
    """The 1-2-5 number nearest above ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * 0.9999)


def _short_number(value: float) -> str:
    """A tick label: plain between 0.01 and 10 000, else mantissa and power of ten (``2e-5``)."""
    if 0.01 <= abs(value) < 10_000:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _series(frame: pl.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of the rows where ``y`` was logged (not null, not NaN)."""
    if y not in frame.columns:
        return np.empty(0), np.empty(0)
    kept = frame.select(x, pl.col(y).cast(pl.Float64)).drop_nulls().filter(pl.col(y).is_not_nan())
    return kept.get_column(x).to_numpy(), kept.get_column(y).to_numpy()


def _line(x, y, name: str, color: str, style: Style, **extra) -> dict:
    return {"type": "scatter", "mode": "lines", "x": x, "y": y, "name": name,
            "line": {"color": color, "width": style.line_width, **extra.pop("line", {})}, **extra}  # fmt: skip


def _phase_shapes(
    g: Grid, phases: Sequence[Phase], log_x: bool, style: Style, spikes: Sequence[int] = (), lines: bool = False
) -> tuple[list[dict], list[dict]]:
    """A shaded band per phase on every row (``lines``: a line at each phase's start instead,
    for heatmaps, which hide what is below them), the phase names above the top row, and a
    dotted line at every loss spike."""
    shapes, notes = [], []
    for phase in phases:
        color = PHASE_COLORS.get(phase.name, PALETTE[-1])
        for row in range(1, g.rows + 1):
            refs = g.refs(row)
            if lines:
                shapes.append({
                    "type": "line", "xref": refs["xaxis"], "yref": f"{refs['yaxis']} domain", "x0": phase.start,
                    "x1": phase.start, "y0": 0, "y1": 1, "line": {"color": color, "width": 2}, "layer": "above",
                })  # fmt: skip
            else:
                shapes.append({
                    "type": "rect", "xref": refs["xaxis"], "yref": f"{refs['yaxis']} domain", "x0": phase.start,
                    "x1": phase.end, "y0": 0, "y1": 1, "fillcolor": color, "opacity": 0.12, "line": {"width": 0},
                    "layer": "below",
                })  # fmt: skip
        mid = math.sqrt(max(phase.start, 1) * max(phase.end, 1)) if log_x else (phase.start + phase.end) / 2
        notes.append({
            "x": math.log10(mid) if log_x else mid, "xref": "x", "y": 1.0, "yref": "paper", "yanchor": "bottom",
            "text": phase.name, "showarrow": False, "font": {"color": color, "size": style.font_size},
        })  # fmt: skip
    for step in spikes:
        for row in range(1, g.rows + 1):
            refs = g.refs(row)
            shapes.append({
                "type": "line", "xref": refs["xaxis"], "yref": f"{refs['yaxis']} domain", "x0": step, "x1": step,
                "y0": 0, "y1": 1, "line": {"color": SPIKE_COLOR, "width": 1.5, "dash": "dot"}, "layer": "above",
            })  # fmt: skip
        notes.append({
            "x": math.log10(max(step, 1)) if log_x else step, "xref": "x", "y": 1.0, "yref": "paper",
            "yanchor": "top", "text": "↯", "showarrow": False, "hovertext": f"loss spike at step {step}",
            "font": {"color": SPIKE_COLOR, "size": style.font_size},
        })  # fmt: skip
    return shapes, notes


def _window_labels(frame: pl.DataFrame) -> list[str]:
    """``steps lo–hi−1`` of each window (its first and last step)."""
    return [f"steps {lo}–{hi - 1}" for lo, hi in zip(frame["step_lo"], frame["step_hi"], strict=True)]


def _window_edges(windows: pl.DataFrame) -> np.ndarray:
    """Cell edges of consecutive windows (``step_lo`` of each, then the last ``step_hi``); the
    centres where windows leave gaps."""
    lo, hi = windows["step_lo"].to_numpy(), windows["step_hi"].to_numpy()
    if len(lo) and (lo[1:] == hi[:-1]).all():
        return np.append(lo, hi[-1])
    return (lo + hi - 1) / 2


def _window_steps(rows: pl.DataFrame, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A step line over windows: ``x`` = each window's start and the last window's end, ``y`` the
    window's value (repeated at the end), hover labels of the windows."""
    labels = _window_labels(rows)
    if not rows.height:
        return np.empty(0), np.empty(0), []
    x = np.append(rows["step_lo"].to_numpy(), rows["step_hi"].to_numpy()[-1])
    return x, np.append(values, values[-1]), [*labels, labels[-1]]


def _step_axis(g: Grid, log_x: bool, title: str = "training step") -> None:
    for row in range(1, g.rows + 1):
        g.x(row)["type"] = "log" if log_x else "linear"
    g.x(g.rows).update(_title(title + (" (log scale)" if log_x else "")))


# ── overview ────────────────────────────────────────────────────────────────────────


def _split_name(split: str) -> str:
    return "train" if split == "train" else "validation"


def training_curves(steps: pl.DataFrame, phases: Sequence[Phase], style: Style, log_x: bool = False,
                    spikes: Sequence[int] = ()) -> go.Figure:
    """Train/validation loss (log scale) and accuracy over steps, phases shaded, spikes marked."""
    g = grid(2, shared_x=True)
    traces = []
    for row, metric in ((1, "loss"), (2, "acc")):
        for split in ("train", "val"):
            x, y = _series(steps, "step", f"{split}_{metric}")
            traces.append(_line(x, y, _split_name(split), SPLIT_COLORS[split], style, legendgroup=split,
                                showlegend=row == 1, **g.refs(row)))  # fmt: skip
    losses = [y for t in traces[:2] for y in t["y"]]
    g.y(1).update(_title("loss (nats)"), type="log", **log_ticks(losses))
    g.y(2).update(_title("accuracy"), range=[0, 1.02], tickformat=".0%")
    _step_axis(g, log_x)
    shapes, notes = _phase_shapes(g, phases, log_x, style, spikes)
    layout = {**g.layout, "shapes": shapes, "annotations": notes, "hovermode": "x unified"}
    return _figure(traces, layout, style, "Training curves", 560, notes=True)


def constant_value(steps: pl.DataFrame, column: str) -> float | None:
    """The value of ``column`` when it is logged and the same at every logged step, else ``None``."""
    _, y = _series(steps, "step", column)
    return float(y[0]) if y.size and (y == y[0]).all() else None


def optimizer_curves(steps: pl.DataFrame, phases: Sequence[Phase], style: Style, log_x: bool = False,
                     spikes: Sequence[int] = ()) -> go.Figure:
    """Parameter norm, update norm and learning rate over steps, phases shaded, spikes marked.

    A constant learning rate gets no panel: the title states it.
    """
    lr = constant_value(steps, "lr")
    rows = [
        ("param_norm", "‖θ‖ (L2)", "parameter norm", "linear"),
        ("update_norm", "‖Δθ‖ (L2)", "update norm", "log"),
        *([("lr", "learning rate", "learning rate", "linear")] if lr is None else []),
    ]
    g = grid(len(rows), shared_x=True, v_space=0.06 if len(rows) == 3 else 0.08)
    traces = []
    for row, (column, axis_title, name, y_type) in enumerate(rows, start=1):
        x, y = _series(steps, "step", column)
        traces.append(_line(x, y, name, PALETTE[row + 3], style, **g.refs(row)))
        g.y(row).update(_title(axis_title), type=y_type, exponentformat="e")
        if y_type == "log":
            g.y(row).update(log_ticks(y))
    _step_axis(g, log_x)
    shapes, notes = _phase_shapes(g, phases, log_x, style, spikes)
    layout = {**g.layout, "shapes": shapes, "annotations": notes, "hovermode": "x unified"}
    title = "Parameters and optimizer" + ("" if lr is None else f" · learning rate {lr:g} at every step")
    return _figure(traces, layout, style, title, 620 if lr is None else 480, legend=False, notes=True)


# ── components ──────────────────────────────────────────────────────────────────────


def component_heatmap(
    matrix: pl.DataFrame, order: Sequence[str], measure: str, quantity: str, style: Style,
    phases: Sequence[Phase] = (), spikes: Sequence[int] = (),
) -> go.Figure:
    """Groups (rows, model order top to bottom) × step windows (columns, over their spans) of ``value``."""
    windows = matrix.select("step_lo", "step_hi").unique().sort("step_lo")
    groups = _ordered(matrix.get_column("group").to_list(), order)
    row_of = pl.DataFrame({"group": groups, "row": np.arange(len(groups))})
    col_of = windows.select("step_lo", col=pl.int_range(pl.len()))
    cells = matrix.join(row_of, on="group").join(col_of, on="step_lo")
    z = np.full((len(groups), windows.height), np.nan)
    z[cells["row"].to_numpy(), cells["col"].to_numpy()] = cells["value"].to_numpy()
    hover = np.tile(np.array(_window_labels(windows), dtype=object), (len(groups), 1))
    trace = {
        "type": "heatmap", "z": z, "x": _window_edges(windows), "y": groups, "customdata": hover,
        "colorbar": {"title": {"text": MEASURE_TITLES[measure].format(q=quantity), "side": "right"}},
        "hovertemplate": "%{y}<br>%{customdata}<br>%{z:.4g}<extra></extra>",
    }  # fmt: skip
    if measure == "signed":
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        trace.update(colorscale="RdBu", reversescale=True, zmid=0.0, zmin=-bound, zmax=bound)
    elif measure == "share":
        trace.update(colorscale="Viridis", zmin=0.0, zmax=1.0)
        trace["colorbar"]["tickformat"] = ".0%"
    else:
        trace.update(colorscale="Viridis", zmin=0.0)
    shapes, notes = _phase_shapes(grid(), phases, False, style, spikes, lines=True)
    layout = {"xaxis": _title("training step"), "yaxis": {"autorange": "reversed"}, "shapes": shapes,
              "annotations": notes}
    height = min(220 + 28 * len(groups), 900)
    return _figure([trace], layout, style, f"Influence by component and step window ({measure})", height, legend=False,
                   notes=bool(notes))


def component_lines(
    matrix: pl.DataFrame,
    colors: dict[str, str],
    order: Sequence[str],
    measure: str,
    quantity: str,
    style: Style,
    cumulative: bool = False,
    phases: Sequence[Phase] = (),
    spikes: Sequence[int] = (),
) -> go.Figure:
    """One line per group over step windows, flat across each window (optionally the running
    sum up to and including each window)."""
    traces = []
    for (group,), rows in matrix.sort("step_lo").partition_by("group", as_dict=True, maintain_order=True).items():
        y = rows.get_column("value").cum_sum() if cumulative else rows.get_column("value")
        x, y, labels = _window_steps(rows, y.to_numpy())
        traces.append(_line(x, y, group, colors.get(group, PALETTE[-1]), style, line={"shape": "hv"},
                            customdata=labels, hovertemplate="%{customdata}: %{y:.4g}"))  # fmt: skip
    rank = {g: i for i, g in enumerate(_ordered([t["name"] for t in traces], order))}
    traces.sort(key=lambda t: rank[t["name"]])
    axis = ("cumulative " if cumulative else "") + MEASURE_TITLES[measure].format(q=quantity)
    shapes, notes = _phase_shapes(grid(), phases, False, style, spikes)
    layout = {"xaxis": _title("training step"), "yaxis": _title(axis), "hovermode": "x unified", "shapes": shapes,
              "annotations": notes}
    title = "Cumulative influence per component" if cumulative else "Influence per component over steps"
    return _figure(traces, layout, style, title, 480, notes=bool(notes))


def decay_balance(
    totals: pl.DataFrame, colors: dict[str, str], order: Sequence[str], quantity: str, style: Style
) -> go.Figure:
    """Per group: the gradient (data) part and the weight-decay part of the influence, and their sum."""
    groups = _ordered(totals.get_column("group").to_list(), order)
    rows = {r["group"]: r for r in totals.iter_rows(named=True)}
    net = np.array([rows[g]["value"] for g in groups], dtype=float)
    decay = np.array([rows[g]["decay"] for g in groups], dtype=float)
    traces = [
        {"type": "bar", "x": groups, "y": net - decay, "name": "gradient (data) part",
         "marker": {"color": [colors.get(g, PALETTE[0]) for g in groups]}},
        {"type": "bar", "x": groups, "y": decay, "name": "weight-decay part",
         "marker": {"color": "#BAB0AC", "pattern": {"shape": "/"}}},
        {"type": "scatter", "mode": "markers", "x": groups, "y": net, "name": "net influence",
         "marker": {"symbol": "diamond", "size": 14 if style.presentation else 10, "color": "#222222"}},
    ]  # fmt: skip
    layout = {"barmode": "relative", "yaxis": _title(f"influence (Δ {quantity})"), "xaxis": _title("")}
    return _figure(traces, layout, style, "Gradient vs weight-decay balance", 460)


# ── data ────────────────────────────────────────────────────────────────────────────


def _example_label(train: int, text: str | None = None) -> str:
    """``weight decay``, ``#id``, or a one-line rendering of the example (without a trailing note in
    parentheses, at most ``LABEL_CHARS`` characters) with its id: ``23 + 0 = 23 · #412``."""
    if train < 0:
        return "weight decay"
    readable = re.sub(r"\s*\([^()]*\)$", "", text or "")
    if not readable or "\n" in readable:
        return f"#{train}"
    short = readable if len(readable) <= LABEL_CHARS else readable[:LABEL_CHARS - 1] + "…"
    return f"{short} · #{train}"


def top_examples_bar(top: pl.DataFrame, quantity: str, style: Style) -> go.Figure:
    """Horizontal bars of the top proponents (positive) and opponents (negative), each labelled by
    its readable rendering where it has one line (``23 + 0 = 23 · #412``)."""
    ordered = top.sort("value")
    trace = {
        "type": "bar", "orientation": "h", "x": ordered["value"].to_numpy(),
        "y": [_example_label(t, text) for t, text in zip(ordered["train"].to_list(), ordered["text"].to_list(),
                                                           strict=True)],
        "marker": {"color": [SIDE_COLORS.get(s, PALETTE[0]) for s in ordered["side"].to_list()]},
        "customdata": [(t or "").replace("\n", "<br>") for t in ordered["text"].to_list()],
        "hovertemplate": "%{y}: %{x:.4g}<br>%{customdata}<extra></extra>",
    }  # fmt: skip
    layout = {
        "hoverlabel": {"font": {"family": "monospace"}},
        "yaxis": {**_title("training example"), "type": "category"},
        "xaxis": {**_title(f"influence (Δ {quantity})"), "zeroline": True},
    }
    height = 200 + 24 * max(ordered.height, 4)
    return _figure([trace], layout, style, "Top proponents (green) and opponents (red)", height, legend=False)


def example_over_time(frame: pl.DataFrame, train: int, quantity: str, style: Style, phases: Sequence[Phase] = (),
                      spikes: Sequence[int] = ()) -> go.Figure:
    """A training example's influence per step window (bars over the windows' spans) and its
    running sum (a step line)."""
    rows = frame.sort("step_lo")
    lo, hi = rows["step_lo"].to_numpy(), rows["step_hi"].to_numpy()
    g = grid(2, shared_x=True, v_space=0.1)
    x, cumulative, labels = _window_steps(rows, rows["value"].cum_sum().to_numpy())
    traces = [
        {"type": "bar", "x": (lo + hi) / 2, "width": hi - lo, "y": rows["value"].to_numpy(), "name": "per window",
         "marker": {"color": PALETTE[0], "line": {"width": 0.5, "color": "white"}},
         "customdata": _window_labels(rows), "hovertemplate": "%{customdata}: %{y:.4g}<extra></extra>",
         **g.refs(1)},
        _line(x, cumulative, "cumulative", PALETTE[1], style, line={"shape": "hv"}, customdata=labels,
              hovertemplate="up to %{customdata}: %{y:.4g}<extra></extra>", **g.refs(2)),
    ]  # fmt: skip
    g.y(1).update(_title(f"influence (Δ {quantity})"))
    g.y(2).update(_title("cumulative"))
    g.x(2).update(_title("training step"))
    shapes, notes = _phase_shapes(g, phases, False, style, spikes)
    layout = {**g.layout, "shapes": shapes, "annotations": notes, "bargap": 0}
    return _figure(traces, layout, style, f"Influence of training example {_example_label(train)} over time", 520,
                   notes=bool(notes))


def influence_histogram(dist: pl.DataFrame, quantity: str, style: Style, bins: int = 60) -> go.Figure:
    """Histogram of the influences of all training examples (regularizer shown as a line).

    The count axis is logarithmic once a bin holds ``LOG_COUNTS_FROM`` examples, so that
    the tails stay visible next to a tall centre.
    """
    examples = dist.filter(pl.col("train") >= 0).get_column("value").to_numpy()
    regularizer = dist.filter(pl.col("train") < 0).get_column("value").to_list()
    traces, log_counts = [], False
    if examples.size:
        counts, edges = np.histogram(examples, bins=bins)
        centers = (edges[:-1] + edges[1:]) / 2
        log_counts = int(counts.max()) >= LOG_COUNTS_FROM
        traces.append({
            "type": "bar", "x": centers, "y": counts, "width": float(edges[1] - edges[0]),
            "name": "training examples", "hovertemplate": "%{x:.3g}: %{y} examples<extra></extra>",
            "marker": {"color": [SIDE_COLORS["proponent"] if c >= 0 else SIDE_COLORS["opponent"] for c in centers]},
        })  # fmt: skip
    # the weight-decay marker stays inside the examples' range: one far outside it is drawn at the
    # edge with its value, so it does not squeeze the histogram into a few bins
    lo, hi = (float(examples.min()), float(examples.max())) if examples.size else (min(regularizer, default=0.0),
                                                                                 max(regularizer, default=1.0))
    pad = 0.04 * (hi - lo or 1.0)
    shapes, notes = [], []
    for v in regularizer:
        inside = lo - pad <= v <= hi + pad
        x = v if inside else (hi + pad if v > hi else lo - pad)
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
                       "line": {"dash": "dash" if inside else "dot", "color": "#555555"}})  # fmt: skip
        text = "weight decay" if inside else f"weight decay {v:+.3g} {'→' if v > hi else '←'}"
        notes.append({"x": x, "xref": "x", "y": 1, "yref": "paper", "yanchor": "bottom", "text": text,
                      "xanchor": "center" if inside else ("right" if v > hi else "left"), "showarrow": False,
                      "font": {"size": style.font_size}})
    yaxis = {**_title("training examples (count, log scale)"), "type": "log",
             **log_ticks(traces[0]["y"])} if log_counts else {
        **_title("training examples (count)"), "rangemode": "tozero"}  # fmt: skip
    layout = {"yaxis": yaxis, "xaxis": {**_title(f"influence (Δ {quantity})"), "range": [lo - pad, hi + pad]},
              "bargap": 0.02, "shapes": shapes, "annotations": notes}  # fmt: skip
    title = f"Distribution of influences ({examples.size:,} training examples)"
    return _figure(traces, layout, style, title, 420, legend=False, notes=bool(regularizer))


# ── reconstruction ──────────────────────────────────────────────────────────────────


def reconstruction_change(comp: pl.DataFrame, quantity: str, style: Style, phases: Sequence[Phase] = (),
                          spikes: Sequence[int] = ()) -> go.Figure:
    """True vs reconstructed change per step, and the cumulative reconstruction error."""
    rows = comp.sort("step")
    x = rows["step"].to_numpy()
    error = (rows["true_change"] - rows["reconstructed"]).cum_sum().to_numpy()
    g = grid(2, shared_x=True, v_space=0.1, row_heights=[0.6, 0.4])
    traces = [
        _line(x, rows["true_change"].to_numpy(), "true change", PALETTE[0], style, **g.refs(1)),
        _line(x, rows["reconstructed"].to_numpy(), "reconstructed", PALETTE[1], style, line={"dash": "dot"},
              **g.refs(1)),
        _line(x, error, "cumulative error", PALETTE[2], style, **g.refs(2)),
    ]  # fmt: skip
    g.y(1).update(_title(f"Δ {quantity} per step"))
    g.y(2).update(_title("Σ (true − reconstructed)"), exponentformat="e")
    g.x(2).update(_title("training step"))
    shapes, notes = _phase_shapes(g, phases, False, style, spikes)
    layout = {**g.layout, "hovermode": "x unified", "shapes": shapes, "annotations": notes}
    return _figure(traces, layout, style, "True vs reconstructed change", 560, notes=bool(notes))


def residual_figure(comp: pl.DataFrame, quantity: str, style: Style, phases: Sequence[Phase] = (),
                    spikes: Sequence[int] = ()) -> go.Figure:
    """|quadrature residual| and |data-split residual| per step (log scale), and nodes used."""
    rows = comp.sort("step")
    x = rows["step"].to_numpy()
    g = grid(2, shared_x=True, v_space=0.1, row_heights=[0.65, 0.35])
    traces = []
    for i, (column, name) in enumerate((("quadrature_residual", "quadrature"), ("optimizer_residual", "data-split"))):
        if column not in rows.columns:
            continue
        positive = rows[column].cast(pl.Float64).abs().to_numpy().astype(float)
        positive[~(positive > 0)] = np.nan  # zeros and missing values have no place on a log axis
        traces.append(_line(x, positive, f"{name} residual", PALETTE[2 + 2 * i], style, **g.refs(1)))
    traces.append(_line(x, rows["nodes"].to_numpy(), "nodes", PALETTE[6], style, line={"shape": "hv"}, **g.refs(2)))
    residuals = [y for t in traces[:-1] for y in t["y"]]
    g.y(1).update(_title(f"|residual| (Δ {quantity})"), type="log", exponentformat="e", **log_ticks(residuals))
    g.y(2).update(_title("quadrature nodes"), rangemode="tozero")
    g.x(2).update(_title("training step"))
    shapes, notes = _phase_shapes(g, phases, False, style, spikes)
    layout = {**g.layout, "hovermode": "x unified", "shapes": shapes, "annotations": notes}
    return _figure(traces, layout, style, "Residuals and quadrature nodes per step", 520, notes=bool(notes))


def exactness_figure(exactness: pl.DataFrame, style: Style) -> go.Figure:
    """Agreement and KL of reconstructed vs true predictions, one bar per quadrature."""
    names = exactness["quadrature"].to_list()
    evals = exactness["gradient_evaluations"].to_numpy()
    g = grid(1, 2)
    traces = [
        {"type": "bar", "x": names, "y": exactness["agreement"].to_numpy(), "marker": {"color": PALETTE[0]},
         "customdata": evals, "texttemplate": "%{y:.3f}",
         "hovertemplate": "%{x}: %{y:.4f}<br>%{customdata:,} gradient evaluations", **g.refs(1, 1)},
        {"type": "bar", "x": names, "y": exactness["kl"].to_numpy(), "marker": {"color": PALETTE[2]},
         "customdata": evals, "texttemplate": "%{y:.2e}",
         "hovertemplate": "%{x}: %{y:.3e}<br>%{customdata:,} gradient evaluations", **g.refs(1, 2)},
    ]  # fmt: skip
    g.y(1, 1).update(_title("agreement"), range=[0, 1.05], tickformat=".0%")
    g.y(1, 2).update(_title("KL (nats)"))
    g.x(1, 1).update(_title("quadrature rule"))
    g.x(1, 2).update(_title("quadrature rule"))
    notes = _subplot_titles(g, ("agreement with true predictions", "KL(true ‖ reconstructed)"), style)
    layout = {**g.layout, "annotations": notes}
    return _figure(traces, layout, style, "Exactness of the reconstruction", 420, legend=False, notes=True)


# ── pruning and comparison ──────────────────────────────────────────────────────────


def method_label(method: str) -> str:
    """How a pruning method is named in legends and tables."""
    return METHOD_LABELS.get(method, method.replace("_", " ").replace("-", " "))


def _method_order(present: Iterable[str]) -> list[str]:
    """Known methods first (in ``METHOD_LABELS`` order), the others sorted; the dense reference left out."""
    names = set(present) - {DENSE}
    return [m for m in METHOD_LABELS if m in names] + sorted(names - set(METHOD_LABELS))


def _method_marks(methods: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """(colour, marker symbol, line dash) per method, distinct for every method of a run."""
    out, extra = {}, 0
    for method in methods:
        if method in METHOD_MARKS:
            out[method] = (METHOD_COLORS[method], *METHOD_MARKS[method])
        else:
            symbol, dash = EXTRA_MARKS[extra % len(EXTRA_MARKS)]
            out[method] = (PALETTE[(4 + extra) % len(PALETTE)], symbol, dash)
            extra += 1
    return out


def sparsity_position(sparsity) -> np.ndarray:
    """Where a sparsity sits on the pruning charts' x axis: log10(s / (1 − s)).

    10 %, 50 % and 90 % sit symmetrically and 90 %, 99 %, 99.9 % one unit apart.
    """
    s = np.asarray(sparsity, dtype=float)
    return np.log10(s / (1 - s))


def _sparsity_ticks(sparsities: np.ndarray) -> dict:
    """Tick positions and ``%`` labels within the run's sparsities, at least a sixth of the range apart."""
    lo, hi = float(sparsity_position(sparsities.min())), float(sparsity_position(sparsities.max()))
    gap = max(hi - lo, 1.0) / 6
    ticks: list[float] = []
    for s in sorted(SPARSITY_TICKS, reverse=True):  # from the sparse end, where the interesting points are
        x = float(sparsity_position(s))
        if lo - 0.05 <= x <= hi + 0.05 and all(abs(x - t) >= gap for t in ticks):
            ticks.append(x)
    ticks.sort()
    labels = [f"{100 / (1 + 10 ** -x):.4g}%" for x in ticks]
    return {"tickvals": ticks, "ticktext": labels}


def pruning_stats(pruning: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Per method and sparsity: mean, min and max of ``metric`` over seeds, and the number of seeds."""
    return (
        pruning.group_by("method", "sparsity")
        .agg(mean=pl.col(metric).mean(), lo=pl.col(metric).min(), hi=pl.col(metric).max(), seeds=pl.len())
        .sort("method", "sparsity")
    )


def pruning_figure(pruning: pl.DataFrame, style: Style) -> go.Figure:
    """Agreement, accuracy and KL vs sparsity per method (mean over seeds, band = min–max).

    The x axis places sparsity ``s`` at log10(s / (1 − s)) (``sparsity_position``). The
    dense model (the ``dense`` row, sparsity 0) is a dotted reference line in each panel;
    without that row, agreement 100 % and KL 0 hold by definition and are drawn alone.
    Every method gets its own colour, mark and dash; bands are drawn first and the
    kernel curve last, so no curve hides another.
    """
    panels = (("agreement", "agreement", ".0%", "agreement with dense"),
              ("accuracy", "accuracy", ".0%", "held-out accuracy"),
              ("kl", "KL (nats)", None, "KL(dense ‖ pruned)"))  # fmt: skip
    swept = pruning.filter(pl.col("method") != DENSE)
    dense = pruning.filter(pl.col("method") == DENSE)
    methods = _method_order(swept.get_column("method").unique().to_list())
    marks = _method_marks(methods)
    g = grid(1, 3, h_space=0.09)
    sparsities = swept.get_column("sparsity").to_numpy()
    ticks = _sparsity_ticks(sparsities) if sparsities.size else {}
    span = [float(sparsity_position(sparsities.min())), float(sparsity_position(sparsities.max()))] if ticks else [0, 1]
    pad = 0.06 * max(span[1] - span[0], 1.0)
    bands, lines, refs = [], [], []
    for col, (metric, title, fmt, _) in enumerate(panels, start=1):
        stats = pruning_stats(swept, metric)
        for method in methods:
            color, symbol, dash = marks[method]
            rows = stats.filter(pl.col("method") == method)
            x = sparsity_position(rows["sparsity"].to_numpy())
            if rows.height and (rows["hi"] - rows["lo"]).abs().max() > 0:
                bands.append({
                    "type": "scatter", "mode": "lines", "x": np.concatenate([x, x[::-1]]),
                    "y": np.concatenate([rows["hi"].to_numpy(), rows["lo"].to_numpy()[::-1]]), "fill": "toself",
                    "fillcolor": _rgba(color, 0.28), "line": {"width": 0.5, "color": _rgba(color, 0.6)},
                    "hoverinfo": "skip", "showlegend": False, "legendgroup": method, **g.refs(1, col),
                })  # fmt: skip
            seeds = int(rows["seeds"].max()) if rows.height else 1
            legend = method_label(method) + (f" (mean of {seeds} seeds, band = min–max)" if seeds > 1 else "")
            lines.append(_line(
                x, rows["mean"].to_numpy(), legend, color, style, mode="lines+markers",
                line={"dash": dash}, marker={"symbol": symbol, "size": style.marker_size, "color": color},
                legendgroup=method, showlegend=col == 1, legendrank=10 + methods.index(method),
                customdata=np.stack([rows["sparsity"].to_numpy() * 100, rows["seeds"].to_numpy()], axis=-1),
                hovertemplate=f"{method_label(method)}<br>sparsity %{{customdata[0]:.4g}}%: %{{y:.4g}}"
                              "<br>%{customdata[1]} seed(s)<extra></extra>",
                **g.refs(1, col),
            ))  # fmt: skip
        reference = float(dense[metric].mean()) if dense.height else {"agreement": 1.0, "kl": 0.0}.get(metric)
        if reference is not None:
            refs.append(_line(
                [span[0] - pad, span[1] + pad], [reference, reference], "dense model (nothing pruned)", "#222222",
                style,
                line={"dash": "dot", "width": style.line_width / 2}, legendgroup=DENSE, showlegend=col == 1,
                legendrank=1, hovertemplate="dense model: %{y:.4g}<extra></extra>", **g.refs(1, col),
            ))  # fmt: skip
        g.y(1, col).update(_title(title), **({"tickformat": fmt} if fmt else {"rangemode": "tozero"}))
        g.x(1, col).update(_title("sparsity (share of weights zeroed)"), range=[span[0] - pad, span[1] + pad],
                           zeroline=False, **ticks)
    order = {m: i for i, m in enumerate(methods)}
    lines.sort(key=lambda t: -order.get(t["legendgroup"], 0))  # the first-listed method drawn last, on top
    layout = {**g.layout, "annotations": _subplot_titles(g, [p[3] for p in panels], style), "showlegend": True,
              "legend": {"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom", "xanchor": "left",
                         "x": 0.0}}  # fmt: skip
    names = ", ".join(method_label(m) for m in methods) if len(methods) <= 3 else f"{len(methods)} methods"
    fig = _figure([*bands, *refs, *lines], layout, style, f"Pruning the final model: {names}", 540, legend=False,
                  notes=True)
    fig.layout.margin.b = 60 + (2 * style.font_size + 10) * math.ceil((len(methods) + 1) / 2)
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def pruning_table(pruning: pl.DataFrame) -> pl.DataFrame:
    """One row per method and sparsity: means over seeds and the number of seeds (no seed column)."""
    measures = ("agreement", "accuracy", "kl", "achieved_sparsity")
    summary = (
        pruning.group_by("method", "sparsity")
        .agg(*[pl.col(m).mean() for m in measures], seeds=pl.len())
    )
    rank = {m: i for i, m in enumerate([DENSE, *_method_order(summary["method"].unique().to_list())])}
    return (
        summary.with_columns(order=pl.col("method").replace_strict(rank, return_dtype=pl.Int64))
        .sort("order", "sparsity")
        .select(method=pl.col("method").map_elements(method_label, return_dtype=pl.String), sparsity="sparsity",
                seeds="seeds", **{m: m for m in measures})
    )


def compare_curves(runs: Sequence[tuple[str, pl.DataFrame]], style: Style, log_x: bool = False) -> go.Figure:
    """Loss and accuracy of several runs on shared axes; the line dash tells the runs apart."""
    g = grid(2, shared_x=True)
    traces = []
    for r, (name, steps) in enumerate(runs):
        for row, metric in ((1, "loss"), (2, "acc")):
            for split in ("train", "val"):
                x, y = _series(steps, "step", f"{split}_{metric}")
                traces.append(_line(
                    x, y, f"{name} · {_split_name(split)}", SPLIT_COLORS[split], style,
                    line={"dash": RUN_DASHES[r % len(RUN_DASHES)]}, legendgroup=f"{r}{split}", showlegend=row == 1,
                    **g.refs(row),
                ))  # fmt: skip
    losses = [y for t in traces if t["yaxis"] == "y" for y in t["y"]]
    g.y(1).update(_title("loss (nats)"), type="log", **log_ticks(losses))
    g.y(2).update(_title("accuracy"), range=[0, 1.02], tickformat=".0%")
    _step_axis(g, log_x)
    return _figure(traces, {**g.layout, "hovermode": "x unified"}, style, "Training curves", 600)


def compare_shares(
    runs: Sequence[tuple[str, pl.DataFrame]], colors: dict[str, str], order: Sequence[str], style: Style
) -> go.Figure:
    """Each group's share of the total |influence|, one bar per run (hatched for the second)."""
    groups = _ordered([g for _, totals in runs for g in totals.get_column("group").to_list()], order)
    traces = []
    for r, (name, totals) in enumerate(runs):
        share = dict(totals.select("group", "share").iter_rows())
        traces.append({
            "type": "bar", "x": groups, "y": [share.get(g) for g in groups], "name": name,
            "marker": {"color": [colors.get(g, PALETTE[-1]) for g in groups],
                       "pattern": {"shape": "" if r == 0 else "/", "fillmode": "overlay"},
                       "line": {"color": "#333333", "width": 1}},
            "hovertemplate": f"{name}<br>%{{x}}: %{{y:.1%}}<extra></extra>",
        })  # fmt: skip
    layout = {"barmode": "group", "xaxis": _title(""),
              "yaxis": {**_title("share of |influence|"), "tickformat": ".0%", "rangemode": "tozero"}}  # fmt: skip
    return _figure(traces, layout, style, "Component shares", 460)


# ── run card ────────────────────────────────────────────────────────────────────────


def _fmt_number(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _fmt_mapping(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt_mapping(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt_mapping(v) for v in value) + ")"
    return _fmt_number(value)


def _seconds(value) -> str:
    if not isinstance(value, (int, float)):
        return MISSING
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


TRAINING_KEYS = ("steps", "seed", "eval_every", "batch_size", "train_frac", "val_frac", "schedule")
OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "dampening", "amsgrad")


def run_card(meta: dict) -> pl.DataFrame:
    """The run's facts as a two-column table (``field``, ``value``) for the Overview page.

    The task's configuration is split three ways: the model's own settings, the training
    loop's (``TRAINING_KEYS``) and the optimizer's (``OPTIMIZER_KEYS``, shown with the
    optimizer's recorded hyper-parameters, which are what the decomposition used).
    """
    spec = meta.get("model_spec") or {}
    summary = meta.get("model_summary") or {}
    optimizer = meta.get("optimizer") or {}
    groups = optimizer.get("groups") or []
    first_group = groups[0] if groups else {}
    hparams = {k: v for k, v in first_group.items() if v is not None and k not in {"params", "param_names"}}
    config = (spec.get("config") if isinstance(spec, dict) else None) or {}
    model = {k: v for k, v in config.items() if k not in TRAINING_KEYS and k not in OPTIMIZER_KEYS}
    training = {k: v for k, v in config.items() if k in TRAINING_KEYS}
    if summary.get("parameters") is not None:
        size = f"{_fmt_number(summary.get('parameters'))} parameters in {_fmt_number(summary.get('tensors'))} tensors"
    else:
        size = MISSING
    rows = [
        ("task", str(meta.get("task") or spec.get("task") or spec.get("model") or MISSING)),
        ("model config", _fmt_mapping(model) if model else MISSING),
        ("model size", size),
        ("training config", _fmt_mapping(training) if training else MISSING),
        ("optimizer", f"{optimizer.get('class', MISSING)} ({optimizer.get('family', MISSING)} family)"),
        ("optimizer hyper-parameters", _fmt_mapping(hparams) if hparams else MISSING),
        ("parameter groups", _fmt_number(len(groups)) if groups else MISSING),
        ("loss", str(spec.get("loss") or ("cross_entropy" if spec.get("task") else MISSING))),
        ("targets", {"float": "floating-point (regression)", "class": "class ids"}.get(meta.get("targets"), MISSING)),
        ("steps", _fmt_number(meta.get("steps"))),
        ("explained quantity", _fmt_mapping(meta.get("quantity"))),
        ("quadrature", _fmt_mapping(meta.get("quadrature"))),
        ("max relative residual", _fmt_number(meta.get("max_rel_residual"))),
        ("max absolute residual", _fmt_number(meta.get("max_abs_residual"))),
        ("data-split residual (relative)", _fmt_number(meta.get("max_rel_split_residual"))),
        ("data split", str(meta.get("data_split") or MISSING)),
        ("gradient evaluations", _fmt_number(meta.get("gradient_evaluations"))),
        ("compute time", _seconds(meta.get("seconds"))),
        ("data fingerprint", str(meta.get("data_fingerprint") or MISSING)),
    ]
    return pl.DataFrame({"field": [r[0] for r in rows], "value": [r[1] for r in rows]})


def phase_table(phases: Sequence[Phase]) -> pl.DataFrame:
    """One row per phase with its first and last step, both included (``Phase`` intervals
    share their boundary step, which belongs to the later phase)."""
    last = [p.end if i == len(phases) - 1 else p.end - 1 for i, p in enumerate(phases)]
    return pl.DataFrame({
        "phase": [p.name for p in phases], "first step": [p.start for p in phases], "last step": last,
        "steps": [b - p.start + 1 for p, b in zip(phases, last, strict=True)],
    })  # fmt: skip


# ── progress measures ───────────────────────────────────────────────────────────────

PROGRESS_COLORS = {"restricted loss": "#59A14F", "excluded loss": "#B07AA1"}


def progress_curves(
    steps: pl.DataFrame, progress: pl.DataFrame, keys: Sequence[int], phases: Sequence[Phase], style: Style,
    log_x: bool = False, spikes: Sequence[int] = (),
) -> go.Figure:
    """Train and validation loss with the progress measures (``measure, step, value``) on one log
    axis, phases shaded and spikes marked; ``keys`` are the key frequencies they use."""
    g = grid(1)
    traces = []
    for split in ("train", "val"):
        x, y = _series(steps, "step", f"{split}_loss")
        traces.append(_line(x, y, f"{_split_name(split)} loss", SPLIT_COLORS[split], style))
    for (measure,), rows in progress.sort("step").partition_by("measure", as_dict=True, maintain_order=True).items():
        traces.append(_line(rows["step"].to_numpy(), rows["value"].to_numpy(), measure,
                            PROGRESS_COLORS.get(measure, PALETTE[len(traces)]), style, line={"dash": "dash"}))
    g.y(1).update(_title("loss (nats)"), type="log", **log_ticks([y for t in traces for y in t["y"]]))
    _step_axis(g, log_x)
    shapes, notes = _phase_shapes(g, phases, log_x, style, spikes)
    layout = {**g.layout, "shapes": shapes, "annotations": notes, "hovermode": "x unified"}
    shown = ", ".join(map(str, keys)) if keys else "none"
    return _figure(traces, layout, style, f"Progress measures (key frequencies {shown})", 480, notes=True)


# ── units of partitions: heads, neurons, frequencies ────────────────────────────────


def _unit_names(units: Sequence[str], labels: Sequence[int | None], keys: Sequence[int]) -> list[str]:
    """Row labels: each unit's name, the key frequencies marked with ``KEY_MARK``."""
    marked = set(keys)
    return [f"{KEY_MARK} {u}" if label is not None and label in marked else u
            for u, label in zip(units, labels, strict=True)]


def unit_heatmap(
    matrix: pl.DataFrame, measure: str, quantity: str, style: Style, title: str, keys: Sequence[int] = (),
    phases: Sequence[Phase] = (), spikes: Sequence[int] = (),
) -> go.Figure:
    """Units (rows, in the order of ``matrix``: the partition's, ``other`` last) × step windows of
    ``value``; units whose ``label`` is a key frequency are marked."""
    windows = matrix.select("step_lo", "step_hi").unique().sort("step_lo")
    first = matrix.unique("unit", keep="first", maintain_order=True)
    units, labels = first["unit"].to_list(), first["label"].to_list()
    row_of = pl.DataFrame({"unit": units, "row": np.arange(len(units))})
    col_of = windows.select("step_lo", col=pl.int_range(pl.len()))
    cells = matrix.join(row_of, on="unit").join(col_of, on="step_lo")
    z = np.full((len(units), windows.height), np.nan)
    z[cells["row"].to_numpy(), cells["col"].to_numpy()] = cells["value"].to_numpy()
    names = _unit_names(units, labels, keys)
    trace = {
        "type": "heatmap", "z": z, "x": _window_edges(windows), "y": names,
        "customdata": np.tile(np.array(_window_labels(windows), dtype=object), (len(units), 1)),
        "colorbar": {"title": {"text": MEASURE_TITLES[measure].format(q=quantity), "side": "right"}},
        "hovertemplate": "%{y}<br>%{customdata}<br>%{z:.4g}<extra></extra>",
    }  # fmt: skip
    if measure == "signed":
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        trace.update(colorscale="RdBu", reversescale=True, zmid=0.0, zmin=-bound, zmax=bound)
    else:
        trace.update(colorscale="Viridis", zmin=0.0, **({"zmax": 1.0} if measure == "share" else {}))
    shapes, notes = _phase_shapes(grid(), phases, False, style, spikes, lines=True)
    layout = {"xaxis": _title("training step"), "yaxis": {"autorange": "reversed", "type": "category"},
              "shapes": shapes, "annotations": notes}
    height = min(220 + (16 if len(units) > 30 else 26) * len(units), 1400)
    return _figure([trace], layout, style, f"{title} ({measure})", height, legend=False, notes=bool(notes))


def unit_totals_bar(totals: pl.DataFrame, quantity: str, style: Style, title: str,
                    keys: Sequence[int] = ()) -> go.Figure:
    """Per unit over the selected steps: the gradient (data) part and the weight-decay part of its
    influence (stacked) and the net influence; key frequencies marked."""
    names = _unit_names(totals["unit"].to_list(), totals["label"].to_list(), keys)
    net, decay = totals["value"].to_numpy(), totals["decay"].to_numpy()
    key = [name.startswith(KEY_MARK) for name in names]
    traces = [
        {"type": "bar", "x": names, "y": net - decay, "name": "gradient (data) part",
         "marker": {"color": [PALETTE[2] if k else PALETTE[0] for k in key]}},
        {"type": "bar", "x": names, "y": decay, "name": "weight-decay part",
         "marker": {"color": "#BAB0AC", "pattern": {"shape": "/"}}},
        {"type": "scatter", "mode": "markers", "x": names, "y": net, "name": "net influence",
         "marker": {"symbol": "diamond", "size": 10 if style.presentation else 7, "color": "#222222"}},
    ]  # fmt: skip
    layout = {"barmode": "relative", "yaxis": _title(f"influence (Δ {quantity})"),
              "xaxis": {**_title(""), "type": "category", "tickangle": -60 if len(names) > 12 else 0}}
    return _figure(traces, layout, style, title, 460)
