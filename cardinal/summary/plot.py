"""Step 5 (on request): test accuracy by epoch and by training time, and steady-state img/s bars.

``require_matplotlib`` runs before anything is printed, so a missing matplotlib is one line and exit 2.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cardinal.plotting import pyplot, save_figure
from cardinal.summary.group import Group, legend
from cardinal.summary.load import CUMULATIVE_TIME
from cardinal.summary.render import header_lines
from cardinal.summary.takeaways import SPEED_NAME

if TYPE_CHECKING:
    from cardinal.summary import Summary


def require_matplotlib() -> None:
    """Fail before any output when --plot cannot be drawn (cardinal.plotting names the extra)."""
    pyplot()


def literal(text: str) -> str:
    """Text from the runs as written: a '$' would start matplotlib's math mode."""
    return text.replace("$", r"\$")


def accuracy_curve(group: Group) -> pd.DataFrame:
    """Per epoch: mean and std of test accuracy over seeds, and the mean cumulative training time."""
    frame = pd.concat([r.frame[["epoch", "test_acc", CUMULATIVE_TIME]] for r in group.runs])
    curve = frame.groupby("epoch").agg(mean=("test_acc", "mean"), std=("test_acc", "std"), n=("test_acc", "size"),
                                       time=(CUMULATIVE_TIME, "mean"))
    return curve


@dataclass
class Style:
    """How a setting is drawn: ten colours; past ten, another marker and bar hatch (50 looks), past 50
    another line too (250 curves), so a sweep of many settings never draws two curves alike."""

    index: int

    def color(self, colors):
        return colors(self.index % len(COLOURS))

    @property
    def marker(self) -> str:
        return MARKERS[self.index // len(COLOURS) % len(MARKERS)]

    @property
    def hatch(self) -> str:
        return HATCHES[self.index // len(COLOURS) % len(HATCHES)]

    @property
    def line(self) -> str | tuple:
        return LINES[self.index // (len(COLOURS) * len(MARKERS)) % len(LINES)]


COLOURS = range(10)  # matplotlib's tab10
MARKERS = ("o", "s", "^", "D", "v")
HATCHES = ("", "//", "..", "xx", "\\\\")
LINES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)))
FIGURE_WIDTH_IN = 17.0
LEGEND_CHAR_IN = 0.075  # the legend's width per character at matplotlib's default font size


def _legend_columns(labels: list[str]) -> int:
    """As many columns as the longest entry lets fit across the figure, at most 3."""
    widest = max(len(label) for label in labels) + 6  # the marker and the gap to the next column
    return max(1, min(3, len(labels), int(FIGURE_WIDTH_IN / (widest * LEGEND_CHAR_IN))))


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "h"
    if seconds >= 180:
        return 60.0, "min"
    return 1.0, "s"


def _draw_accuracy(axis, x: np.ndarray, curve: pd.DataFrame, color, style: Style, label: str | None) -> None:
    """Mean over seeds with a ±std band; a single epoch gets an error bar instead (a band needs two)."""
    if len(curve) == 1:
        axis.errorbar(x, curve["mean"], yerr=curve["std"].fillna(0), marker=style.marker, markersize=7, capsize=5,
                      color=color, label=label)
        return
    axis.plot(x, curve["mean"], marker=style.marker, linestyle=style.line, color=color, label=label)
    if (curve["n"] >= 2).any():
        axis.fill_between(x, curve["mean"] - curve["std"], curve["mean"] + curve["std"], color=color, alpha=0.2,
                          linewidth=0)


def _draw_speed(axis, models: pd.DataFrame, names: list[str], colors) -> None:
    """Horizontal bars (long labels stay readable), each labelled with its value ± std."""
    positions = np.arange(len(models))[::-1]
    means, stds = models["median_img_per_s"], models["median_img_per_s_std"].fillna(0)
    styles = [Style(i) for i in range(len(models))]
    bars = axis.barh(positions, means, xerr=stds, color=[s.color(colors) for s in styles], capsize=4)
    for bar, style in zip(bars, styles):
        bar.set_hatch(style.hatch)
    labels = [f"{m:,.1f}" + (f" ± {s:,.1f}" if s else "") + (" (epoch 1)" if one else "")
              for m, s, one in zip(means, stds, models["speed_with_warm_up"])]
    axis.bar_label(bars, labels=labels, padding=6)
    axis.set_yticks(positions, [literal(textwrap.fill(name, 32)) for name in names])
    axis.set_xlim(0, float((means + stds).max()) * 1.45)
    axis.set(title=f"Training speed ({SPEED_NAME})", xlabel="img/s (mean ± std over seeds)")


def plot(summary: Summary, path: Path) -> None:
    """Test accuracy by epoch and by cumulative training time (mean, ±std over seeds), and speed bars; each
    setting named as the tables name it (what tells it apart, its length where that varies), what all share
    in the figure's title."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    groups = summary.groups
    names = legend(groups, with_length=True)
    short = [names.label(i) for i in range(len(groups))]
    curves = [accuracy_curve(g) for g in groups]
    scale, unit = _time_unit(max(float(c["time"].max()) for c in curves))
    height = max(5.2, 0.45 * len(groups) + 1.5)  # the speed bars keep room for two-line names
    figure, (by_epoch, by_time, speed) = plt.subplots(1, 3, figsize=(FIGURE_WIDTH_IN, height),
                                                      gridspec_kw={"width_ratios": [1, 1, 1.2]})
    colors = plt.get_cmap("tab10")
    for index, (group, curve) in enumerate(zip(groups, curves)):
        style = Style(index)
        label = literal(f"{short[index]} (n={len(group.runs)})")
        _draw_accuracy(by_epoch, curve.index.to_numpy(), curve, style.color(colors), style, label)
        _draw_accuracy(by_time, curve["time"].to_numpy() / scale, curve, style.color(colors), style, None)
    last = max(int(c.index.max()) for c in curves)
    by_epoch.set_xlim(0.5, last + 0.5)
    if last <= 20:
        by_epoch.set_xticks(range(1, last + 1))
    else:
        by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_epoch.set(title="Test accuracy by epoch (mean ± std over seeds)", xlabel="epoch", ylabel="test accuracy %")
    by_time.set_xlim(left=0)
    by_time.set(title="Test accuracy by training time", xlabel=f"cumulative training time ({unit})",
                ylabel="test accuracy %")
    for axis in (by_epoch, by_time):
        axis.grid(alpha=0.3)
        axis.margins(y=0.15)
    position = {g.label: i for i, g in enumerate(groups)}
    _draw_speed(speed, summary.models, [short[position[m]] for m in summary.models["model"]], colors)
    handles, labels = by_epoch.get_legend_handles_labels()
    columns = _legend_columns(labels)
    figure.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    title = " ".join(header_lines(names))
    if title:
        figure.suptitle(literal(textwrap.fill(title, 200)), fontsize="medium")
    legend_in = (0.3 + 0.25 * math.ceil(len(labels) / columns)) / height
    figure.tight_layout(rect=(0, legend_in, 1, 1))
    save_figure(figure, path)


