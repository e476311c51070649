"""The plotly figures of the HTML report, built from a run and its findings.

Every figure comes as a :class:`FigureSpec` that also says how a finding is highlighted on it
(by step range, by layer row, by module column), so that the page script only draws shapes.
Strings from the run are escaped before they reach plotly, because plotly renders a subset of
HTML inside labels and hover text: a layer named ``<b>fc</b>`` must read literally, not bold.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from gradscope.detect.advice import loss_view
from gradscope.findings import Finding, Severity
from gradscope.reporting.downsample import bucket_matrix, envelope, nonfinite_marks
from gradscope.store.run import Run
from gradscope.store.schema import INPUT_LAYER

__all__ = ["SEVERITY_COLORS", "FigureSpec", "build_figures"]

SEVERITY_COLORS = {Severity.ERROR: "#c62828", Severity.WARNING: "#e65100", Severity.INFO: "#1565c0"}
NONFINITE_COLOR = "#d500f9"  # magenta: not in any colour scale used here, so NaN/Inf cannot be mistaken for a value

# Display budgets. A line keeps min and max per bucket, so MAX_LINE_POINTS points show
# MAX_LINE_POINTS / 2 buckets; 4000 points is finer than any screen is wide. Heatmaps keep 600
# step buckets: ~2 px per bucket on a wide screen, and 50 layers × 600 cells of float32 hover data
# cost ~0.5 MB per heatmap.
MAX_LINE_POINTS = 4000
MAX_HEATMAP_BUCKETS = 600
# A log axis when a positive series spans more than two decades: below that a linear axis reads better.
LOG_AXIS_DECADES = 2.0


@dataclass
class FigureSpec:
    """One plot of the report.

    Attributes:
        id: the HTML id of the plot's div (fixed, so the same run gives the same page).
        title: the section heading.
        kind: how findings are highlighted: ``"time"`` (step range), ``"heatmap"`` (step range and
            layer rows), ``"modules"`` (module columns).
        figure: the plotly figure.
        rows: raw names of the layers/modules the highlight can point at, by position on the plot.
        caption: how to read the plot (plain text).
    """

    id: str
    title: str
    kind: str
    figure: go.Figure
    rows: list[str] = field(default_factory=list)
    caption: str = ""


def plotly_text(value: object) -> str:
    """Escape a run-provided string for plotly's HTML-like label rendering."""
    return html.escape(str(value), quote=False)


def build_figures(run: Run, findings: Sequence[Finding]) -> list[FigureSpec]:
    """Every figure the run has data for, in page order."""
    specs = [
        training_curves(run, findings),
        layer_heatmap(
            run,
            "grad_norm",
            fig_id="gs-heat-grad-norm",
            title="Gradient norm per layer",
            label="grad norm",
            caption="Colour is log10 of the largest gradient norm of each layer in each step bucket; layers in forward "
            "order, input side on top. A dark band towards the input means vanishing gradients; bright cells, exploding "
            "ones. Magenta: NaN/Inf gradients. Grey: nothing recorded.",
            nan_is_missing=False,
        ),
        layer_heatmap(
            run,
            "update_ratio",
            fig_id="gs-heat-update-ratio",
            title="Update / weight ratio per layer",
            label="‖Δθ‖/‖θ‖",
            caption="Colour is log10 of the largest ‖Δθ‖/‖θ‖ per step bucket: around 1e-3 is typical for SGD-like "
            "training; 1e-1 and above rewrites the weights every step, 1e-5 and below barely moves them. "
            "Magenta: Inf. Grey: not measured on these steps.",
            nan_is_missing=True,
        ),
        activation_health(run),
    ]
    return [s for s in specs if s is not None]


# --------------------------------------------------------------------------- training curves


def _finite(values: np.ndarray) -> np.ndarray:
    finite: np.ndarray = values[np.isfinite(values)]
    return finite


def _wants_log(values: np.ndarray) -> bool:
    finite = _finite(values)
    if not len(finite) or finite.min() <= 0:
        return False
    return bool(math.log10(finite.max() / finite.min()) > LOG_AXIS_DECADES)


def _loss_given(run: Run) -> np.ndarray:
    """``(n_steps,)`` bool: the steps whose ``Monitor.step()`` was given a loss, as the detectors read
    them (``LossView``): the others hold a NaN placeholder that is no NaN loss (``loss_missing``), and
    an older run whose loss is NaN throughout with no ``loss_given`` in its metadata was never given one."""
    lv = loss_view(run)
    return lv.given if lv.recorded else np.zeros(run.n_steps, dtype=bool)


def training_curves(run: Run, findings: Sequence[Finding]) -> FigureSpec | None:
    """Loss, learning rate and global gradient norm over steps, sharing one zoomable step axis.

    The loss line joins the steps that were given a loss: the others are no value, neither a point nor
    a NaN/Inf mark (a loop passing its loss every tenth step still gets a line); a run never given one
    has no loss row.
    """
    if run.n_steps == 0:
        return None
    steps = run.steps
    given = _loss_given(run)
    series: list[tuple[str, np.ndarray]] = []
    if given.any():
        series.append(("loss", run.loss))
    if np.isfinite(run.lr).any():
        series.append(("learning rate", run.lr))
    series.append(("global gradient norm", run.grad_norm))

    fig = make_subplots(
        rows=len(series), cols=1, shared_xaxes=True, vertical_spacing=0.05, subplot_titles=[name for name, _ in series]
    )
    downsampled = run.n_steps > MAX_LINE_POINTS
    everywhere = np.ones(run.n_steps, dtype=bool)
    findings_row = 1 if given.any() else len(series)  # findings sit on the loss curve; without one, on the gradient norm
    for row, (name, values) in enumerate(series, start=1):
        # A step given no loss holds a NaN placeholder, no NaN loss: it is left out of the line and
        # unmarked (a gap at each would leave a loss given every tenth step as invisible, isolated points).
        drawn = given if name == "loss" else everywhere
        x, y = envelope(steps[drawn], values[drawn], MAX_LINE_POINTS)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines",
                name=name,
                line={"width": 1.3, "color": "#37474f"},
                hovertemplate=f"step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>",
                showlegend=False,
            ),
            row=row,
            col=1,
        )
        finite = _finite(values)
        top = float(finite.max()) if len(finite) else 1.0  # where NaN/Inf marks sit: the top of the drawn range
        marks = nonfinite_marks(steps[drawn], values[drawn], MAX_LINE_POINTS // 2)
        if len(marks):
            fig.add_trace(
                go.Scatter(
                    x=marks.steps,
                    y=np.full(len(marks), top),
                    mode="markers",
                    name=f"{name}: NaN/Inf",
                    marker={"symbol": "x", "size": 9, "color": NONFINITE_COLOR},
                    customdata=np.stack([marks.last_steps, marks.counts, marks.n_nan, marks.n_inf], axis=1),
                    hovertemplate=f"{name} non-finite from step %{{x}} to %{{customdata[0]}}: %{{customdata[1]}} steps "
                    "(%{customdata[2]} NaN, %{customdata[3]} Inf)<extra></extra>",
                    showlegend=False,
                ),
                row=row,
                col=1,
            )
        if _wants_log(values):
            fig.update_yaxes(type="log", row=row, col=1)
        elif len(finite) and finite.min() == finite.max() > 0:
            # A constant (e.g. a fixed learning rate): autorange would centre it in a ±50% band below zero.
            fig.update_yaxes(range=[0, 2 * float(finite.max())], row=row, col=1)
        if row == findings_row:
            _mark_findings(fig, steps, values, findings, top, row)

    fig.update_xaxes(title_text="step", row=len(series), col=1)
    fig.update_layout(height=220 * len(series) + 60, margin={"l": 70, "r": 30, "t": 40, "b": 50}, hovermode="closest")
    names = [name for name, _ in series]
    caption = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names).capitalize()
    caption += "; drag to zoom (the plots share the step axis). " if len(names) > 1 else "; drag to zoom. "
    if downsampled:
        caption += (
            f"{run.n_steps:,} steps are drawn as the minimum and maximum of each of {MAX_LINE_POINTS // 2:,} buckets, "
            "so single-step spikes stay visible. "
        )
    if not given.any():
        caption += "No loss curve: monitor.step() was never given a loss. "
    elif not given.all():
        caption += f"The loss line joins the {int(given.sum()):,} of {run.n_steps:,} steps whose monitor.step() was given a loss. "
    caption += "Magenta crosses: NaN/Inf values (not drawable). Dotted lines: the steps of findings."
    return FigureSpec("gs-curves", "Training curves", "time", fig, caption=caption)


def _mark_findings(
    fig: go.Figure, steps: np.ndarray, values: np.ndarray, findings: Sequence[Finding], top: float, row: int
) -> None:
    """Dotted lines across the plots at the findings' steps, and a marker per finding on ``values`` (plot ``row``)."""
    xs: list[int] = []
    ys: list[float] = []
    texts: list[str] = []
    colors: list[str] = []
    for f in findings:
        if f.step is None:
            continue
        color = SEVERITY_COLORS[f.severity]
        fig.add_shape(
            type="line",
            xref="x",
            yref="paper",
            x0=f.step,
            x1=f.step,
            y0=0,
            y1=1,
            line={"color": color, "width": 1, "dash": "dot"},
            opacity=0.7,
        )
        at = int(np.searchsorted(steps, f.step))
        value = values[at] if at < len(values) and steps[at] == f.step else np.nan
        xs.append(f.step)
        ys.append(float(value) if np.isfinite(value) else top)
        texts.append(f"<b>{plotly_text(f.code)}</b> ({f.severity.value}) at step {f.step}<br>{plotly_text(_clip(f.message, 160))}")
        colors.append(color)
    if not xs:
        return
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            name="findings",
            marker={"symbol": "triangle-down", "size": 12, "color": colors, "line": {"width": 1, "color": "white"}},
            hovertext=texts,
            hoverinfo="text",
            showlegend=False,
        ),
        row=row,
        col=1,
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- per-layer heatmaps


def layer_heatmap(
    run: Run, metric: str, *, fig_id: str, title: str, label: str, caption: str, nan_is_missing: bool
) -> FigureSpec | None:
    """A layers × steps heatmap of ``log10(metric)``, one cell per step bucket holding its maximum.

    The maximum (not the mean) keeps a one-step explosion visible after bucketing; a vanishing
    layer stays dark because its maximum is small too. Non-finite values get their own overlay.
    ``metric`` is a per-step one (its rows are :attr:`Run.steps`).
    """
    if metric not in run.metrics or run.n_steps == 0:
        return None
    values, names = run.metric_array(metric)  # float32: the buckets' min and max need no float64 copy of a long run
    position = {name: i for i, name in enumerate(names)}
    layers = [layer for layer in run.layers if layer in position]
    if not layers or not len(values):
        return None
    matrix = values if layers == names else values[:, [position[layer] for layer in layers]]
    if not np.isfinite(matrix).any() and (nan_is_missing or not np.isnan(matrix).any()):
        return None
    steps = run.steps
    buckets = bucket_matrix(steps, matrix, MAX_HEATMAP_BUCKETS, missing=np.isnan(matrix) if nan_is_missing else None)

    hi = buckets.hi  # (buckets, layers)
    positive = hi[np.isfinite(hi) & (hi > 0)]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(hi)
    # Zeros (no gradient at all) sit one decade below the smallest positive value: darkest, but on the scale.
    floor = math.floor(math.log10(positive.min())) - 1.0 if len(positive) else -1.0
    z[np.isfinite(hi) & (hi <= 0)] = floor
    finite_z = z[np.isfinite(z)]
    zmin = float(finite_z.min()) if len(finite_z) else floor
    zmax = float(finite_z.max()) if len(finite_z) else floor + 1
    if zmax - zmin < 1e-9:
        zmin, zmax = zmin - 0.5, zmax + 0.5

    names = [plotly_text(layer) for layer in layers]
    x = buckets.centers
    # (layers, buckets, 4): first step, last step, min, max — what a hover needs, compact as float32.
    custom = np.stack(
        [
            np.broadcast_to(buckets.first_steps[:, None], hi.shape),
            np.broadcast_to(buckets.last_steps[:, None], hi.shape),
            buckets.lo,
            buckets.hi,
        ],
        axis=-1,
    ).transpose(1, 0, 2).astype(np.float32)
    ticks = _decade_ticks(zmin, zmax)
    fig = go.Figure(
        go.Heatmap(
            x=x,
            y=names,
            z=z.T.astype(np.float32),
            zmin=zmin,
            zmax=zmax,
            colorscale="Viridis",
            customdata=custom,
            hovertemplate=f"%{{y}}<br>steps %{{customdata[0]}}–%{{customdata[1]}}<br>{label}: "
            "min %{customdata[2]:.3g}, max %{customdata[3]:.3g}<extra></extra>",
            colorbar={"title": {"text": label}, "tickvals": [t for t, _ in ticks], "ticktext": [s for _, s in ticks]},
        )
    )
    if (buckets.nonfinite > 0).any():
        bad = np.where(buckets.nonfinite > 0, 1.0, np.nan).T.astype(np.float32)
        fig.add_trace(
            go.Heatmap(
                x=x,
                y=names,
                z=bad,
                customdata=buckets.nonfinite.T.astype(np.float32),
                colorscale=[[0.0, NONFINITE_COLOR], [1.0, NONFINITE_COLOR]],
                showscale=False,
                hovertemplate="%{y}<br>step ≈ %{x:.0f}<br>%{customdata} NaN/Inf values<extra></extra>",
            )
        )
        # A cell can be a fraction of a pixel wide; a marker keeps the first NaN/Inf of each layer in sight.
        has_bad = buckets.nonfinite > 0  # (buckets, layers)
        bad_layers = np.flatnonzero(has_bad.any(axis=0))
        first_bucket = has_bad.argmax(axis=0)[bad_layers]
        fig.add_trace(
            go.Scatter(
                x=x[first_bucket],
                y=[names[i] for i in bad_layers],
                customdata=buckets.first_steps[first_bucket],
                mode="markers",
                marker={"symbol": "x", "size": 10, "color": NONFINITE_COLOR, "line": {"width": 1, "color": "white"}},
                hovertemplate="%{y}<br>first NaN/Inf in the bucket from step %{customdata}<extra></extra>",
                showlegend=False,
            )
        )
    # Every layer labelled while the labels fit (≤ 60 rows at ≥ 16 px); beyond that plotly thins them out.
    ticks_every_row = {"tickmode": "linear", "dtick": 1} if len(layers) <= 60 else {}
    fig.update_yaxes(
        autorange="reversed", title_text="layer (forward order)", type="category", tickfont={"size": 11}, **ticks_every_row
    )
    fig.update_xaxes(title_text="step")
    fig.update_layout(
        height=max(260, min(1100, 100 + 20 * len(layers))),
        margin={"l": 140, "r": 30, "t": 40, "b": 50},
        plot_bgcolor="#e0e0e0",
    )
    return FigureSpec(fig_id, title, "heatmap", fig, rows=list(layers), caption=caption)


def _decade_ticks(zmin: float, zmax: float) -> list[tuple[float, str]]:
    decades = list(range(math.ceil(zmin), math.floor(zmax) + 1))
    if len(decades) >= 2:
        step = max(1, len(decades) // 8)
        return [(float(d), f"1e{d}") for d in decades[::step]]
    return [(float(v), f"{10**v:.2g}") for v in np.linspace(zmin, zmax, 3)]


# --------------------------------------------------------------------------- activations

_ACTIVATION_ROWS = (
    ("act_dead_frac", "dead units (fraction)"),
    ("act_saturated_frac", "saturated (fraction)"),
    ("act_std", "activation std"),
)


def activation_health(run: Run) -> FigureSpec | None:
    """Dead-unit fraction, saturation fraction and activation std through depth, at the last sample.

    Bars are the last sampled step; diamonds the first, so drift over training shows as a gap.
    """
    if len(run.activation_steps) == 0:
        return None
    frames = {m: run.metric(m) for m, _ in _ACTIVATION_ROWS if m in run.metrics}
    if not frames:
        return None
    candidates = [INPUT_LAYER, *run.forward_order]
    modules = [m for m in candidates if any(m in f.columns and np.isfinite(f[m].to_numpy()).any() for f in frames.values())]
    if not modules:
        return None
    names = [plotly_text(m) for m in modules]
    rows = [(m, label) for m, label in _ACTIVATION_ROWS if m in frames]
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=[label for _, label in rows])
    sampled: list[str] = []
    for row, (metric, label) in enumerate(rows, start=1):
        frame = frames[metric].reindex(columns=modules)
        values = frame.to_numpy(dtype=np.float64)
        has_any = np.isfinite(values).any(axis=1)
        if not has_any.any():
            continue
        last_i, first_i = int(np.flatnonzero(has_any)[-1]), int(np.flatnonzero(has_any)[0])
        last_step, first_step = int(frame.index[last_i]), int(frame.index[first_i])
        if not sampled:
            sampled = [f"last sample at step {last_step:,}", f"first at step {first_step:,}"]
        fig.add_trace(
            go.Bar(
                x=names,
                y=np.where(np.isfinite(values[last_i]), values[last_i], np.nan),
                name=f"{label}, step {last_step}",
                marker={"color": "#546e7a"},
                hovertemplate=f"%{{x}}<br>{label} at step {last_step}: %{{y:.3g}}<extra></extra>",
                showlegend=False,
            ),
            row=row,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=names,
                y=np.where(np.isfinite(values[first_i]), values[first_i], np.nan),
                mode="markers",
                name=f"{label}, step {first_step}",
                marker={"symbol": "diamond", "size": 8, "color": "#ffb300", "line": {"width": 1, "color": "#5d4037"}},
                hovertemplate=f"%{{x}}<br>{label} at step {first_step}: %{{y:.3g}}<extra></extra>",
                showlegend=False,
            ),
            row=row,
            col=1,
        )
        if metric != "act_std":
            fig.update_yaxes(range=[0, 1.05], row=row, col=1)
        elif _wants_log(values[last_i]):
            fig.update_yaxes(type="log", row=row, col=1)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names)
    fig.update_layout(height=200 * len(rows) + 120, margin={"l": 70, "r": 30, "t": 40, "b": 110}, bargap=0.25)
    caption = (
        "Per module in forward order (the model's input first). Bars: "
        + (", ".join(sampled) if sampled else "last sample")
        + " (diamonds). Dead units never fired on a whole batch; saturated values sit at the bounds of a "
        "sigmoid/tanh-like activation (empty for unbounded ones); the std should neither collapse nor blow up through depth."
    )
    return FigureSpec("gs-activations", "Activation health through depth", "modules", fig, rows=modules, caption=caption)


def figure_json(spec: FigureSpec) -> dict[str, Any]:
    """The figure as the page script consumes it: data and layout, without the template (shared once per page)."""
    # to_dict() turns numpy arrays into plotly's compact base64 typed arrays.
    out: dict[str, Any] = spec.figure.to_dict()
    out.get("layout", {}).pop("template", None)
    return {"id": spec.id, "kind": spec.kind, "data": out.get("data", []), "layout": out.get("layout", {})}
