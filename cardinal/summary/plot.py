"""Step 5 (on request): test accuracy by epoch and by training time, and steady-state img/s bars.

``require_matplotlib`` runs before anything is printed, so a missing matplotlib is one line and exit 2.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cardinal.plotting import pyplot, save_figure
from cardinal.summary.group import Group
from cardinal.summary.load import CUMULATIVE_TIME
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


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "h"
    if seconds >= 180:
        return 60.0, "min"
    return 1.0, "s"


def _draw_accuracy(axis, x: np.ndarray, curve: pd.DataFrame, color, label: str | None) -> None:
    """Mean over seeds with a ±std band; a single epoch gets an error bar instead (a band needs two)."""
    if len(curve) == 1:
        axis.errorbar(x, curve["mean"], yerr=curve["std"].fillna(0), marker="o", markersize=7, capsize=5,
                      color=color, label=label)
        return
    axis.plot(x, curve["mean"], marker="o", color=color, label=label)
    if (curve["n"] >= 2).any():
        axis.fill_between(x, curve["mean"] - curve["std"], curve["mean"] + curve["std"], color=color, alpha=0.2,
                          linewidth=0)


def _draw_speed(axis, models: pd.DataFrame, colors) -> None:
    """Horizontal bars (long labels stay readable), each labelled with its value ± std."""
    positions = np.arange(len(models))[::-1]
    means, stds = models["median_img_per_s"], models["median_img_per_s_std"].fillna(0)
    bars = axis.barh(positions, means, xerr=stds, color=[colors(i % 10) for i in range(len(models))], capsize=4)
    labels = [f"{m:,.1f}" + (f" ± {s:,.1f}" if s else "") + (" (epoch 1)" if one else "")
              for m, s, one in zip(means, stds, models["speed_with_warm_up"])]
    axis.bar_label(bars, labels=labels, padding=6)
    axis.set_yticks(positions, [literal(textwrap.fill(m, 28)) for m in models["model"]])
    axis.set_xlim(0, float((means + stds).max()) * 1.45)
    axis.set(title=f"Training speed ({SPEED_NAME})", xlabel="img/s (mean ± std over seeds)")


def plot(summary: Summary, path: Path) -> None:
    """Test accuracy by epoch and by cumulative training time (mean, ±std over seeds), and speed bars."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    curves = [accuracy_curve(g) for g in summary.groups]
    scale, unit = _time_unit(max(float(c["time"].max()) for c in curves))
    figure, (by_epoch, by_time, speed) = plt.subplots(1, 3, figsize=(17, 5.2),
                                                      gridspec_kw={"width_ratios": [1, 1, 1.2]})
    colors = plt.get_cmap("tab10")
    for index, (group, curve) in enumerate(zip(summary.groups, curves)):
        label = literal(f"{group.label} (n={len(group.runs)})")
        _draw_accuracy(by_epoch, curve.index.to_numpy(), curve, colors(index % 10), label)
        _draw_accuracy(by_time, curve["time"].to_numpy() / scale, curve, colors(index % 10), None)
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
    _draw_speed(speed, summary.models, colors)
    handles, labels = by_epoch.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False)
    figure.tight_layout(rect=(0, 0.05 + 0.05 * math.ceil(len(labels) / 3), 1, 1))
    save_figure(figure, path)


