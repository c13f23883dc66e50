"""The paper's filter figures (Figures 7-9 and 11) of one or more `FilterReport`s, as one PNG
(`hf-graft analyze --plot`). matplotlib is an optional dependency: the `plot` extra."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from hf_graft.graft.filters import FilterReport

__all__ = ["plot_reports"]


def _short_layer_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _l1_map(report: FilterReport, width: int) -> np.ndarray:
    """[layers, width] image: each layer's filter norms sorted in descending order, stretched
    over the full width (column c shows the filter at rank c * filters / width)."""
    image = np.full((len(report.layers), width), np.nan)
    for row, layer in enumerate(report.layers):
        if layer.filters == 0:
            continue
        ordered = np.sort(layer.l1)[::-1]
        image[row] = ordered[(np.arange(width) * layer.filters) // width]
    return image


def plot_reports(
    reports: Mapping[str, FilterReport] | Sequence[tuple[str, FilterReport]],
    path: str | os.PathLike,
    *,
    dpi: int = 110,
) -> str:
    """Write one PNG with the paper's filter figures for one or more models.

    (a) ratio of filters with l1 below a threshold vs the threshold, log x (Figure 7);
    (b) per-layer entropy bars, models side by side, with the total in the legend (Figure 8);
    (c) one l1 map per model: a row per conv layer, filters sorted by l1 along x, log colours,
        black for l1 under a tenth of the smallest threshold (Figures 9 and 11).
    Returns the path written.
    """
    # a bare Figure renders with Agg and leaves pyplot's global state (and backend) alone
    try:
        import matplotlib
    except ImportError as err:  # an optional dependency: the `plot` extra
        raise ImportError('plot_reports needs matplotlib: pip install "hf_graft[plot]"') from err
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    items = list(reports.items()) if isinstance(reports, Mapping) else list(reports)
    if not items:
        raise ValueError("plot_reports needs at least one report")
    n_models = len(items)
    n_layers = max(len(r.layers) for _, r in items)
    same_layers = all([la.name for la in r.layers] == [la.name for la in items[0][1].layers] for _, r in items)

    all_l1 = np.concatenate([la.l1 for _, r in items for la in r.layers] or [np.zeros(1)])
    thresholds = sorted({t for _, r in items for t in r.thresholds})
    positive = all_l1[all_l1 > 0]
    low = min(thresholds[0] / 10, positive.min() if positive.size else thresholds[0] / 10)
    high = max(thresholds[-1] * 10, float(all_l1.max()) * 1.01 if all_l1.size else 1.0)

    map_height = max(3.0, 0.16 * n_layers)
    width = max(12.0, min(6.0 * n_models, 30.0), 0.12 * n_layers * max(1, min(n_models, 3)))
    fig = Figure(figsize=(width, 4.0 + 4.5 + map_height + 1.0), layout="constrained")
    grid = fig.add_gridspec(3, n_models, height_ratios=[4.0, 4.5, map_height])
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]

    _plot_invalid_ratios(fig.add_subplot(grid[0, :]), items, low, high, colors)
    _plot_entropies(fig.add_subplot(grid[1, :]), items, n_layers, same_layers, colors)
    _plot_l1_maps(fig, grid, items, thresholds, high, same_layers, matplotlib, LogNorm)

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _plot_invalid_ratios(ax, items, low: float, high: float, colors) -> None:
    """(a) Figure 7: the ratio of filters with l1 below a threshold, against the threshold."""
    sweep = np.logspace(math.log10(low), math.log10(high), 200)
    for i, (name, report) in enumerate(items):
        l1 = np.sort(np.concatenate([la.l1 for la in report.layers] or [np.zeros(0)]))
        if l1.size == 0:
            continue
        ratio = np.searchsorted(l1, sweep, side="left") / l1.size  # fraction with l1 < t
        color = colors[i % len(colors)]
        ax.plot(sweep, ratio, color=color, label=name)
        marks = np.array(report.thresholds)
        ax.plot(marks, np.searchsorted(l1, marks, side="left") / l1.size, "o", color=color)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("threshold t (filter l1 norm)")
    ax.set_ylabel("ratio of filters with l1 < t")
    ax.set_title("(a) invalid filters vs threshold")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_entropies(ax, items, n_layers: int, same_layers: bool, colors) -> None:
    """(b) Figure 8: every layer's entropy, the models side by side."""
    n_models = len(items)
    bar_width = 0.8 / n_models
    for i, (name, report) in enumerate(items):
        x = np.arange(len(report.layers)) + (i - (n_models - 1) / 2) * bar_width
        ax.bar(
            x,
            [la.entropy for la in report.layers],
            width=bar_width,
            color=colors[i % len(colors)],
            label=f"{name} (total {report.total_entropy:.2f})",
        )
    if same_layers:
        labels = [_short_layer_name(la.name) for la in items[0][1].layers]
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=max(4, min(8, 500 // max(1, len(labels)))))
    else:
        ax.set_xlabel("conv layer index")
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_ylabel("layer entropy (nats)")
    ax.set_title("(b) per-layer entropy")
    ax.legend(fontsize=8)


def _plot_l1_maps(fig, grid, items, thresholds, high: float, same_layers: bool, matplotlib, LogNorm) -> None:
    """(c) Figures 9 and 11: one map of sorted filter l1 norms per model, a row per conv layer."""
    cmap = matplotlib.colormaps["viridis"].with_extremes(under="black", bad="white")
    norm = LogNorm(vmin=thresholds[0] / 10, vmax=high)
    map_width = int(min(max((la.filters for _, r in items for la in r.layers), default=1), 512))
    image = None
    for i, (name, report) in enumerate(items):
        ax = fig.add_subplot(grid[2, i])
        data = _l1_map(report, map_width)
        # zeros would be masked by the log norm; clamp them under vmin so they show black
        data = np.where(data <= norm.vmin, norm.vmin / 2, data)
        image = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"(c) filter l1: {name}", fontsize=9)
        ax.set_xlabel("filters, sorted by l1 (stretched per layer)")
        ax.set_xticks([])
        ax.set_yticks(np.arange(len(report.layers)))
        if i == 0 or not same_layers:
            ax.set_yticklabels(
                [f"{_short_layer_name(la.name)} ({la.filters})" for la in report.layers],
                fontsize=max(4, min(8, 600 // max(1, len(report.layers)))),
            )
        else:
            ax.set_yticklabels([])
    if image is not None:
        fig.colorbar(image, ax=fig.axes[2:], extend="min", label="filter l1 norm (black: < min threshold / 10)")
