"""Step 4: the summary as text. The table format answers first (the final accuracy of each setting, then
the gaps at the end of runs of equal length) and fits 80 columns; ``everything`` adds the per-epoch
tables, models, speed, takeaways and notes, which markdown always holds. Every text that came from a
file is printed through rich as literal text (rich.markup.escape), never as markup.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cardinal import stats
from cardinal.summary.compare import SWEEP_SIZE
from cardinal.summary.group import CONDITION_NAMES, Group, Legend, legend
from cardinal.summary.load import CUMULATIVE_TIME, KNOB
from cardinal.summary.takeaways import SPEED_NAME, gflops_text, interval_text, seeds_text, signed

if TYPE_CHECKING:
    from cardinal.summary import Summary

SHORT_VERDICTS = {stats.SIGNIFICANT: "sig.", stats.NOT_DISTINGUISHABLE: "n.s.", stats.ONE_SEED: ""}
OPTIONAL_ACCURACY_TITLES = {"val_acc": "Val acc %", "test_acc_ema": "EMA test acc %", "test_acc_tta": "TTA test acc %"}


@dataclass
class View:
    """One table as text cells; ``text`` columns may wrap (at spaces), the others (numbers) are never split."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    text: tuple[str, ...] = ("Setting",)
    compact: bool = False  # no frame: a rule under the header, columns 2 spaces apart


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _mean_std(row: pd.Series, column: str, digits: int) -> str:
    std = row.get(f"{column}_std", math.nan)
    text = _fmt(row[column], digits)
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _once(rows: list[list[str]]) -> list[list[str]]:
    """Rows with a first cell that repeats the row above's left blank: each setting or pair named once above
    its epochs."""
    return [[cells[0] if i == 0 or cells[0] != rows[i - 1][0] else "", *cells[1:]] for i, cells in enumerate(rows)]


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------------ the answer first
def header_lines(names: Legend) -> list[str]:
    lines = [f"Shared: {', '.join(names.shared)}."] if names.shared else []
    if names.by_recipe:
        lines.append("By recipe: " + "; ".join(f"{recipe} = {', '.join(parts)}"
                                               for recipe, parts in names.by_recipe.items()) + ".")
    return lines


def _accuracy_interval(row: pd.Series) -> str:
    if row["runs"] < 2:
        return "1 seed"
    if row["test_acc_too_wide"]:
        return f"too wide: {_seeds(row['runs'])}"
    return f"± {row['test_acc_ci95']:.2f}"


def final_view(summary: Summary, names: Legend) -> View:
    """One row per setting: its final test accuracy, best first."""
    finals = summary.finals.sort_values("test_acc", ascending=False, kind="stable")
    several = finals["runs"].nunique() > 1
    headers = ["Setting", "Epochs"] + (["Seeds"] if several else []) + ["Acc %", "± 95%", "img/s"]
    single = {m.model for m in summary.models.itertuples() if m.speed_with_warm_up}
    rows = []
    for _, row in finals.iterrows():
        if row["stand_in"]:
            epochs = f"{row['epoch']} in {row['length']}"
        else:
            epochs = str(row["epoch"]) if row["finished"] else f"{row['epoch']} of {row['length']}"
        speed = _fmt(row["img_per_s"], 1) + ("*" if row["model"] in single else "")
        rows.append([names.label(row["group"]), epochs] + ([str(row["runs"])] if several else [])
                    + [f"{row['test_acc']:.2f}", _accuracy_interval(row), speed])
    runs, settings = len(summary.runs), len(summary.groups)
    each = "" if several else f", {_seeds(int(finals['runs'].iloc[0]))} each"
    dropped = sum(len(g.dropped) for g in summary.groups)
    rerun = f"; {dropped} re-run{'s' if dropped > 1 else ''} not counted" if dropped else ""
    title = (f"Final test accuracy, best first ({runs} run{'s' if runs > 1 else ''} in {settings} "
             f"setting{'s' if settings > 1 else ''}{each}{rerun})")
    return View(title, headers, rows, ("Setting", "± 95%"), compact=True)


GRID_SIZE = 4  # settings from which a sweep of two conditions is also shown as a grid


def _axis_value(group: Group, name: str) -> Any:
    return {"arch": group.arch, "recipe": group.recipe_name}.get(name, dict(group.conditions).get(name))


def _in_order(values: Iterable[Any]) -> list[Any]:
    """Numbers by size (an LR sweep reads top to bottom), anything else as it first appears."""
    unique = list(dict.fromkeys(values))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in unique)
    return sorted(unique) if numbers else unique


def _axis_title(name: str) -> str:
    return CONDITION_NAMES.get(name, name.removeprefix(KNOB))


def sweep_grid_view(summary: Summary, names: Legend) -> View | None:
    """A sweep of two conditions (every setting told apart by the same two, all finished at one length):
    the final accuracies as a grid, one condition down and the other across, where a long best-first list
    hides the pattern. None for anything else."""
    groups, finals = summary.groups, summary.finals[~summary.finals["stand_in"]].set_index("group")
    axes = {tuple(name for name, _ in parts) for parts in names.parts}
    if (len(groups) < GRID_SIZE or len(axes) != 1 or len(next(iter(axes))) != 2
            or finals["length"].nunique() > 1 or not finals["finished"].all()):
        return None
    down, across = next(iter(axes))
    cells: dict[tuple[Any, Any], int] = {}
    words: dict[tuple[str, Any], str] = {}
    for index, group in enumerate(groups):
        key = (_axis_value(group, down), _axis_value(group, across))
        if key in cells:
            return None  # two settings alike on both: the grid would hide one
        cells[key] = index
        words.update({(name, value): text for (name, text), value in zip(names.parts[index], key)})
    rows, columns = _in_order(k[0] for k in cells), _in_order(k[1] for k in cells)
    if len(rows) < 2 or len(columns) < 2:
        return None
    title = (f"Final test accuracy % by {_axis_title(down)} and {_axis_title(across)} (mean over seeds; "
             "intervals above)")
    headers = [_axis_title(down)] + [words[(across, value)] for value in columns]
    body = [[words[(down, row)]] + [f"{finals.loc[cells[(row, column)], 'test_acc']:.2f}"
                                    if (row, column) in cells else "-" for column in columns] for row in rows]
    return View(title, headers, body, (headers[0],), compact=True)


def _gap_interval(gap: pd.Series) -> str:
    if math.isnan(gap["low"]):
        return "1 seed"
    if gap["too_wide"]:
        return f"too wide: {seeds_text(gap['method'], gap['n_model'], gap['n_baseline']).split(' (')[0]}"
    return f"± {(gap['high'] - gap['low']) / 2:.2f} {SHORT_VERDICTS[gap['verdict']]}"  # t intervals: symmetric


def _ratio(gap: pd.Series) -> str:
    if not math.isfinite(gap["ratio"]):
        return "-"
    word = "too wide" if gap["ratio_too_wide"] else SHORT_VERDICTS[gap["ratio_verdict"]]
    return f"{gap['ratio']:.2f}x {word}".strip()


def final_gap_view(summary: Summary, names: Legend) -> View | None:
    if summary.final_gaps.empty:
        return None
    headers = ["Epochs", "First vs second", "Gap", "± 95%", "img/s"]
    rows = [[str(g["epoch"]), names.pair(g["model_index"], g["baseline_index"]), signed(g["gap"]),
             _gap_interval(g), _ratio(g)] for _, g in summary.final_gaps.iterrows()]
    return View("Gaps at the end of runs of equal length (first - second; img/s as a ratio)", headers, rows,
                ("First vs second", "± 95%", "img/s"), compact=True)


def footer_lines(summary: Summary, everything: bool = False) -> list[str]:
    """The answer's legend; with ``everything``, also that of the per-epoch tables below it."""
    words = []
    per_epoch_gaps = everything and not (summary.gaps.empty and summary.recipe_gaps.empty)
    if not summary.final_gaps.empty or per_epoch_gaps:
        words.append("sig./n.s.: the gap's 95% interval excludes/contains 0; 1 seed: no verdict.")
    if not summary.final_gaps.empty and summary.final_gaps["against_best"].any():
        words.append(f"{SWEEP_SIZE} or more settings compared with one another: each against the best of them.")
    stand_ins = summary.finals.loc[summary.finals["stand_in"], "group"]
    if not stand_ins.empty:
        recipes = ", ".join(dict.fromkeys(summary.groups[i].recipe_name for i in stand_ins))
        words.append(f"k in n ({recipes}): epoch k of n-epoch runs with a constant LR, which stands for a "
                     "k-epoch run in the gaps.")
    if summary.final_gaps.empty and len(summary.groups) > 1:
        words.append("No gaps at the end of runs: no two finished settings of equal length differ only in arch, "
                     "in recipe or in how they ran.")
    star = " (*: warm-up included)" if summary.models["speed_with_warm_up"].any() else ""
    words.append(f"img/s: median of epochs after warm-up{star}, mean over seeds.")
    if not everything:
        words.append("--all: every table.")
    return [" ".join(words)]


# ------------------------------------------------------------------------------------------ everything
@dataclass
class ShortNames:
    """The per-epoch tables' names for settings and pairs: what tells them apart (the length included), the
    rest said once above the tables."""

    names: Legend
    index: dict[str, int]

    @classmethod
    def of(cls, groups: list[Group]) -> ShortNames:
        return cls(legend(groups, with_length=True), {g.label: i for i, g in enumerate(groups)})

    def __call__(self, label: str) -> str:
        return self.names.label(self.index[label])

    def pair(self, model: str, baseline: str) -> str:
        return self.names.pair(self.index[model], self.index[baseline])


def result_view(results: pd.DataFrame, short: ShortNames) -> View:
    headers = ["Setting", "Epoch", "Seeds", "Test acc % ± std", "± 95%", "Train loss", "Train s (cumul.)"]
    rows = [[short(r["model"]), str(r["epoch"]), str(r["runs"]), _mean_std(r, "test_acc", 2),
             _fmt(r["test_acc_ci95"], 2), _fmt(r.get("train_loss", math.nan), 4),
             _fmt(r.get(CUMULATIVE_TIME, math.nan), 1)]
            for _, r in results.iterrows()]
    return View("Results per epoch (mean ± std over seeds)", headers, _once(rows), compact=True)


def other_accuracy_view(results: pd.DataFrame, short: ShortNames) -> View | None:
    """Validation, EMA and TTA accuracies, when the runs recorded any: beside test_acc, never instead."""
    present = [c for c in OPTIONAL_ACCURACY_TITLES if c in results and results[c].notna().any()]
    if not present:
        return None
    headers = ["Setting", "Epoch", "Seeds"] + [f"{OPTIONAL_ACCURACY_TITLES[c]} ± std" for c in present]
    rows = [[short(r["model"]), str(r["epoch"]), str(r["runs"])] + [_mean_std(r, c, 2) for c in present]
            for _, r in results.iterrows()]
    return View("Other accuracies per epoch (mean ± std over seeds)", headers, _once(rows), compact=True)


def model_view(models: pd.DataFrame, short: ShortNames) -> View:
    headers = ["Setting", "Params (M)", "GFLOPs / image", "Best test acc % (epoch)", "Epochs", "Seeds"]
    rows = [[short(m["model"]), _fmt(m["params"] / 1e6, 2), gflops_text(m["gflops"]),
             f"{m['best_test_acc']:.2f} ({m['best_epoch']})", str(m["epochs"]), str(m["runs"])]
            for _, m in models.iterrows()]
    return View("Models", headers, rows, compact=True)


def speed_view(models: pd.DataFrame, short: ShortNames) -> View:
    headers = ["Setting", "img/s ± std", "± 95%", "it/s", "TFLOP/s achieved", "Seeds"]
    rows = [[short(m["model"]), _mean_std(m, "median_img_per_s", 1) + ("*" if m["speed_with_warm_up"] else ""),
             _fmt(m["median_img_per_s_ci95"], 1), _fmt(m["median_it_per_s"], 2),
             _fmt(m["median_train_tflop_per_s"], 3), str(m["runs"])]
            for _, m in models.iterrows()]
    star = "; *: warm-up included" if models["speed_with_warm_up"].any() else ""
    return View(f"Speed ({SPEED_NAME}, mean ± std over seeds{star})", headers, rows, compact=True)


def _gap_cells(gap: pd.Series) -> list[str]:
    seeds = seeds_text(gap["method"], gap["n_model"], gap["n_baseline"])
    if gap["too_wide"]:
        return ["too wide", seeds, SHORT_VERDICTS[stats.NOT_DISTINGUISHABLE]]
    return [interval_text(gap["low"], gap["high"]), seeds, SHORT_VERDICTS[gap["verdict"]]]


def gap_view(gaps: pd.DataFrame, title: str, short: ShortNames) -> View | None:
    if gaps.empty:
        return None
    headers = ["First vs second", "Epoch", "Gap", "95% interval", "Seeds", "Verdict"]
    rows = [[short.pair(g["model"], g["baseline"]), str(g["epoch"]), signed(g["gap"]), *_gap_cells(g)]
            for _, g in gaps.iterrows()]
    return View(f"{title} (first - second, points)", headers, _once(rows), ("First vs second", "Seeds"),
                compact=True)


def answer_views(summary: Summary, names: Legend) -> list[View]:
    views = (final_view(summary, names), sweep_grid_view(summary, names), final_gap_view(summary, names))
    return [v for v in views if v is not None]


def detail_views(summary: Summary) -> list[View]:
    """The per-epoch tables, each setting named by what tells it apart (as in the answer, plus its length)."""
    short = ShortNames.of(summary.groups)
    shown = [result_view(summary.results, short), other_accuracy_view(summary.results, short),
             model_view(summary.models, short), speed_view(summary.models, short),
             gap_view(summary.gaps, "Test accuracy gaps, like with like", short),
             gap_view(summary.recipe_gaps, "Recipe gaps in test accuracy, same arch, setup and length", short)]
    return [view for view in shown if view is not None]


# ------------------------------------------------------------------------------------------------ rich
def _longest_word(texts: Iterable[str]) -> int:
    return max([len(word) for text in texts for word in text.split()] + [1])


def _frame(view: View, columns: int) -> int:
    """Characters a table adds around its cells: compact tables leave two spaces between columns (a pad
    and the column rule), boxed ones three and their edges."""
    return 2 * (columns - 1) if view.compact else 3 * columns + 1


def fit_columns(view: View, width: int) -> tuple[list[str], list[int]]:
    """Headers wrapped to their column, and column widths filling ``width``: number columns keep their
    widest cell (and their header on one line while there is room), text columns share the rest (the
    widest gives way first) but never split a word."""
    widths, flexible = [], []
    for index, header in enumerate(view.headers):
        cells = [row[index] for row in view.rows]
        if header in view.text:
            widths.append(max(len(c) for c in cells + [header]))
            flexible.append(index)
        else:
            widths.append(max([len(c) for c in cells] + [_longest_word([header]), min(6, len(header))]))
    frame = _frame(view, len(widths))
    spare = width - frame - sum(widths)
    floors = {i: _longest_word([view.headers[i]] + [row[i] for row in view.rows]) for i in flexible}
    while spare < 0:
        shrinkable = [i for i in flexible if widths[i] > floors[i]]
        if not shrinkable:
            break  # narrower than the words: the terminal wraps the lines, nothing is cut
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        spare += 1
    for index, header in enumerate(view.headers):
        if index not in flexible and 0 < len(header) - widths[index] <= spare:
            spare -= len(header) - widths[index]
            widths[index] = len(header)
    headers = [header if index in flexible else "\n".join(textwrap.wrap(header, widths[index],
                                                                         break_long_words=False))
               for index, header in enumerate(view.headers)]
    return headers, widths


def _rich_table(view: View, width: int) -> tuple[Table, int]:
    """The table and the width it needs (more than ``width`` only where a word or number is wider)."""
    headers, widths = fit_columns(view, width)
    style = ({"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "padding": (0, 1, 0, 0)}
             if view.compact else {})
    table = Table(**style)
    for header, column_width, name in zip(headers, widths, view.headers):
        table.add_column(escape(header), justify="left" if name in view.text else "right", width=column_width,
                         overflow="fold")
    for cells in view.rows:
        table.add_row(*(escape(cell) for cell in cells))
    return table, sum(widths) + _frame(view, len(widths))


def _print_table(console: Console, view: View) -> None:
    console.print(escape(view.title), highlight=False)  # a line of its own: a title above a table wraps to it
    table, needed = _rich_table(view, console.width)
    if needed > console.width:  # rich would squeeze every column and cut numbers: let the terminal wrap
        console = Console(file=console.file, width=needed, force_terminal=False, color_system=None)
    console.print(table, crop=False)


def _print_lines(console: Console, lines: Iterable[str], bullet: str = "") -> None:
    for line in lines:
        console.print(escape(f"{bullet}{line}"), highlight=False)


def render_rich(summary: Summary, console: Console, everything: bool = False) -> None:
    names = legend(summary.groups)
    _print_lines(console, header_lines(names))
    for view in answer_views(summary, names):
        _print_table(console, view)
    _print_lines(console, footer_lines(summary, everything))
    if not everything:
        return
    for view in detail_views(summary):
        _print_table(console, view)
    for title, lines in (("Takeaways", summary.takeaways), ("Notes", summary.notes)):
        console.print(title, style="bold")
        _print_lines(console, lines, "- ")


def render_table(summary: Summary, width: int, everything: bool = False) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    render_rich(summary, console, everything)
    return "".join(line.rstrip() + "\n" for line in console.file.getvalue().splitlines())


# ---------------------------------------------------------------------------------------- markdown, csv
def _markdown_table(view: View) -> str:
    out = ["| " + " | ".join(view.headers) + " |", "|" + "|".join("---" for _ in view.headers) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in view.rows]
    return "\n".join(out)


def render_markdown(summary: Summary) -> str:
    names = legend(summary.groups)
    parts = header_lines(names) + [""]
    for view in answer_views(summary, names):
        parts += [f"## {view.title}", "", _markdown_table(view), ""]
    parts += footer_lines(summary, everything=True) + [""]
    for view in detail_views(summary):
        parts += [f"## {view.title}", "", _markdown_table(view), ""]
    for title, lines in (("Takeaways", summary.takeaways), ("Notes", summary.notes)):
        parts += [f"## {title}", ""] + [f"- {line}" for line in lines] + [""]
    return "\n".join(parts)


def render_csv(summary: Summary) -> str:
    """One row per group and epoch; group-level columns (size, steady-state speed) repeated on each."""
    group_level = ["model", "params", "gflops"] + [c for c in summary.models.columns if c.startswith("median_")]
    merged = summary.results.merge(summary.models[group_level], on="model", how="left")
    return merged.to_csv(index=False)
