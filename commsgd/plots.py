"""Small PNG figures for reports and benchmarks, drawn with matplotlib's object API (no pyplot state).

A figure is a row (or grid) of `Panel`s; a panel holds `Series` drawn as lines, steps or grouped bars.
Figures are written at 150 dpi by default, sharp enough for a slide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

Kind = Literal["line", "step", "bar"]


@dataclass
class Series:
    """One labelled curve (or one group of bars: `x` are category labels or numbers)."""

    label: str
    x: Sequence[float | str]
    y: Sequence[float]


@dataclass
class Panel:
    """One set of axes."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    kind: Kind = "line"
    ylim: tuple[float, float] | None = None
    xlim: tuple[float, float] | None = None
    logy: bool = False
    logx: bool = False  # base 2 with a tick at each x of the data (worker counts)
    logx_plain: bool = False  # base 10 with matplotlib's own ticks (bytes)
    percent_y: bool = False  # y holds fractions, shown as percent (0.05 -> 5 %)
    color_bars: bool = False  # bars of one series in the line colours, one per category (one per run)
    markers: bool = False
    rotate_xticks: int = 0

    @property
    def empty(self) -> bool:
        return not any(len(s.y) for s in self.series)


def _draw_bars(ax: Axes, panel: Panel) -> None:
    categories: list[str] = []
    for s in panel.series:
        for x in s.x:
            if str(x) not in categories:
                categories.append(str(x))
    width = 0.8 / max(len(panel.series), 1)
    for i, s in enumerate(panel.series):
        heights = dict(zip(map(str, s.x), s.y))
        xs = [j + (i - (len(panel.series) - 1) / 2) * width for j in range(len(categories))]
        colors = [f"C{j % 10}" for j in range(len(categories))] if panel.color_bars else None
        values = [float(heights.get(c, 0.0)) for c in categories]
        bars = ax.bar(xs, values, width=width, label=s.label, color=colors)
        if panel.percent_y:  # the share on each bar: a zero bar is otherwise easy to miss
            ax.bar_label(bars, [f"{100 * v:.1f} %" for v in values], fontsize=7)
            ax.margins(y=0.12)  # room above the tallest bar for its label
    ax.set_xticks(
        range(len(categories)),
        categories,
        rotation=panel.rotate_xticks,
        ha="right" if panel.rotate_xticks else "center",
        fontsize=7 if panel.rotate_xticks else None,
    )


def _percent_decimals(ax: Axes) -> int:
    """Decimals the percent ticks need: none over a wide range, more as the axis narrows (a zoom)."""
    low, high = ax.get_ylim()
    span = 100 * (high - low)
    return 0 if span >= 10 else 1 if span >= 1 else 2


def _draw(ax: Axes, panel: Panel) -> None:
    if panel.kind in ("step", "bar") and not panel.percent_y:  # ranks and counts: whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if panel.kind == "bar":
        _draw_bars(ax, panel)
    else:
        for s in panel.series:  # an empty series too: it keeps its colour and its legend entry
            marker = "o" if panel.markers or len(s.y) == 1 else None
            drawstyle = "steps-post" if panel.kind == "step" else "default"
            ax.plot(
                list(s.x),
                list(s.y),
                label=s.label,
                marker=marker,
                markersize=3,
                linewidth=1.2,
                drawstyle=drawstyle,
            )
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.logy:
        ax.set_yscale("log")
    if panel.logx_plain:
        ax.set_xscale("log")
    if panel.logx:
        ax.set_xscale("log", base=2)
        ticks = sorted({float(x) for ser in panel.series for x in ser.x if isinstance(x, int | float)})
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    if panel.xlim is not None:
        ax.set_xlim(*panel.xlim)
    if panel.percent_y:  # after the limits: the decimals follow the range shown
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=_percent_decimals(ax)))
    ax.grid(True, alpha=0.3)
    if panel.empty:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if any(s.label for s in panel.series) and not panel.empty:
        ax.legend(fontsize=7)


def save_figure(
    path: Path,
    panels: Sequence[Panel],
    title: str = "",
    columns: int = 3,
    dpi: int = 150,
    size: tuple[float, float] = (4.6, 3.5),
) -> Path:
    """Draw `panels` in a grid of at most `columns` per row (each `size` inches) and write a PNG to `path`."""
    if not panels:
        raise ValueError("save_figure: no panels to draw")
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows))
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        _draw(fig.add_subplot(rows, cols, i + 1), panel)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
