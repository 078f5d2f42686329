"""Small PNG figures for reports and benchmarks, drawn with matplotlib's object API (no pyplot state).

A figure is a row (or grid) of `Panel`s; a panel holds `Series` drawn as lines, steps or grouped bars.
Figures are written at 150 dpi by default, sharp enough for a slide.

Many series (a benchmark compares 20 runs): series i keeps colour C(i mod 10) in every panel and the
line style changes with each further ten (solid, dashed, dotted, dash-dot), so no two share a look;
past `SHARED_LEGEND_FROM` entries the panels lose their own legends (which would cover the data) for one
legend under the figure, and bars of one per run lie horizontally with the run's name beside each.
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
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

Kind = Literal["line", "step", "bar"]

#: a figure whose panels hold this many labelled series or more (colours repeat past ten) gets one
#: legend below it
SHARED_LEGEND_FROM = 11
#: bars of one series per category (`color_bars`) lie horizontally from this many categories
HORIZONTAL_BARS_FROM = 11
LineStyle = Literal["-", "--", ":", "-."]
_LINE_STYLES: tuple[LineStyle, ...] = ("-", "--", ":", "-.")


@dataclass
class Series:
    """One labelled curve (or one group of bars: `x` are category labels or numbers)."""

    label: str
    x: Sequence[float | str]
    y: Sequence[float]
    note: str = ""  # what the panel could not show of it ("sent 0 B"), said beside the label

    @property
    def legend_label(self) -> str:
        return f"{self.label} ({self.note})" if self.note else self.label


def series_style(index: int) -> tuple[str, LineStyle]:
    """(colour, line style) of the `index`-th series of a panel: the same index looks the same in
    every panel of a figure."""
    return f"C{index % 10}", _LINE_STYLES[(index // 10) % len(_LINE_STYLES)]


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


def _categories(panel: Panel) -> list[str]:
    categories: list[str] = []
    for s in panel.series:
        for x in s.x:
            if str(x) not in categories:
                categories.append(str(x))
    return categories


def _horizontal(panel: Panel) -> bool:
    return panel.kind == "bar" and panel.color_bars and len(_categories(panel)) >= HORIZONTAL_BARS_FROM


def _draw_bars(ax: Axes, panel: Panel, horizontal: bool) -> None:
    categories = _categories(panel)
    width = 0.8 / max(len(panel.series), 1)
    for i, s in enumerate(panel.series):
        heights = dict(zip(map(str, s.x), s.y))
        xs = [j + (i - (len(panel.series) - 1) / 2) * width for j in range(len(categories))]
        values = [float(heights.get(c, 0.0)) for c in categories]
        if panel.color_bars:  # one colour per category, as the lines of the other panels
            styles = [series_style(j) for j in range(len(categories))]
            colors: list[str] | str = [color for color, _ in styles]
            hatches = ["" if style == "-" else "///" for _, style in styles]
        else:
            colors, hatches = f"C{i % 10}", [""] * len(categories)
        if horizontal:
            bars = ax.barh(xs, values, height=width, label=s.legend_label, color=colors, hatch=hatches)
        else:
            bars = ax.bar(xs, values, width=width, label=s.legend_label, color=colors, hatch=hatches)
        if panel.percent_y:  # the share on each bar: a zero bar is otherwise easy to miss
            ax.bar_label(bars, [f"{100 * v:.1f} %" for v in values], fontsize=6 if horizontal else 7)
            if horizontal:  # room for the labels
                ax.margins(x=0.18)
            else:
                ax.margins(y=0.12)
    if horizontal:
        ax.set_yticks(range(len(categories)), categories, fontsize=6)
        ax.invert_yaxis()  # the first run on top, in the legend's order
        return
    ax.set_xticks(
        range(len(categories)),
        categories,
        rotation=panel.rotate_xticks,
        ha="right" if panel.rotate_xticks else "center",
        fontsize=7 if panel.rotate_xticks else None,
    )


def _percent_decimals(ax: Axes, horizontal: bool = False) -> int:
    """Decimals the percent ticks need: none over a wide range, more as the axis narrows (a zoom)."""
    low, high = ax.get_xlim() if horizontal else ax.get_ylim()
    span = 100 * (high - low)
    return 0 if span >= 10 else 1 if span >= 1 else 2


def _draw(ax: Axes, panel: Panel, legend: bool = True) -> None:
    """Draw `panel` on `ax`, with its own legend unless the figure has one for all (`legend=False`:
    then what the panel could not show of a series is written in its corner instead)."""
    horizontal = _horizontal(panel)
    values_axis = ax.xaxis if horizontal else ax.yaxis
    if panel.kind in ("step", "bar") and not panel.percent_y:  # ranks and counts: whole numbers
        values_axis.set_major_locator(MaxNLocator(integer=True))
    if panel.kind == "bar":
        _draw_bars(ax, panel, horizontal)
    else:
        for i, s in enumerate(panel.series):  # an empty series too: it keeps its colour and legend entry
            color, style = series_style(i)
            marker = "o" if panel.markers or len(s.y) == 1 else None
            drawstyle = "steps-post" if panel.kind == "step" else "default"
            ax.plot(
                list(s.x),
                list(s.y),
                label=s.legend_label,
                marker=marker,
                markersize=3,
                linewidth=1.2,
                drawstyle=drawstyle,
                color=color,
                linestyle=style,
            )
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.ylabel if horizontal else panel.xlabel)
    ax.set_ylabel(panel.xlabel if horizontal else panel.ylabel)
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
        values_axis.set_major_formatter(PercentFormatter(1.0, decimals=_percent_decimals(ax, horizontal)))
    ax.grid(True, alpha=0.3)
    if panel.empty:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if not legend:
        notes = notes_text(panel.series)
        if notes:
            ax.text(
                0.01,
                0.99,
                notes,
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=6,
                color="dimgray",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.0},
            )
    elif any(s.label for s in panel.series) and not panel.empty:
        ax.legend(fontsize=7)


def notes_text(series: Sequence[Series]) -> str:
    """The series' notes grouped by note, one line each: 'sent 0 B: a, b' (names for up to three,
    else a count)."""
    by_note: dict[str, list[str]] = {}
    for s in series:
        if s.note:
            by_note.setdefault(s.note, []).append(s.label)
    lines = []
    for note, labels in by_note.items():
        names = ", ".join(labels) if len(labels) <= 3 else f"{len(labels)} runs"
        lines.append(f"{note}: {names}")
    return "\n".join(lines)


def _legend_entries(panels: Sequence[Panel]) -> list[str]:
    """The labels of the line panel with the most series (bars of one per run carry the same runs)."""
    lines = [p for p in panels if p.kind != "bar"]
    widest = max(lines, key=lambda p: len(p.series), default=None)
    return [s.label for s in widest.series] if widest is not None else []


def draw_figure(
    panels: Sequence[Panel],
    title: str = "",
    columns: int = 3,
    size: tuple[float, float] = (4.6, 3.5),
) -> Figure:
    """`panels` in a grid of at most `columns` per row (each `size` inches). With `SHARED_LEGEND_FROM`
    labelled series or more in a panel, one legend in columns under the grid replaces the panels' own."""
    if not panels:
        raise ValueError("draw_figure: no panels to draw")
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    entries = _legend_entries(panels)
    shared = len([e for e in entries if e]) >= SHARED_LEGEND_FROM
    legend_columns = min(len(entries), 2 * cols + 1)
    legend_height = 0.2 + 0.16 * math.ceil(len(entries) / legend_columns) if shared else 0.0
    height = size[1] * rows + legend_height
    fig = Figure(figsize=(size[0] * cols, height))
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        _draw(fig.add_subplot(rows, cols, i + 1), panel, legend=not shared)
    if shared:
        styles = [series_style(i) for i in range(len(entries))]
        handles = [Line2D([], [], linewidth=1.2, color=color, linestyle=style) for color, style in styles]
        fig.legend(handles, entries, loc="lower center", ncol=legend_columns, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0.0, legend_height / height, 1.0, 1.0))
    return fig


def save_figure(
    path: Path,
    panels: Sequence[Panel],
    title: str = "",
    columns: int = 3,
    dpi: int = 150,
    size: tuple[float, float] = (4.6, 3.5),
) -> Path:
    """`draw_figure(panels, ...)` written as a PNG to `path`."""
    fig = draw_figure(panels, title, columns, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
