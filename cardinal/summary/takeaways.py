"""Step 3, in words: the takeaways and notes (every gap with its verdict, every ratio with its interval)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pandas as pd

from cardinal import stats
from cardinal.records import CONFIG_NAME, CSV_NAME
from cardinal.summary.compare import recipe_pairs, setup_pairs
from cardinal.summary.group import LENGTH, SHOWN_AS_BATCH, Group, comparable_sets, differences
from cardinal.summary.load import KNOB

SPEED_NAME = "median img/s after warm-up"
TOO_WIDE = "too wide"


def seeds_text(method: str, n_model: int, n_baseline: int) -> str:
    if method == "paired":
        return f"paired, {n_model} seeds"
    return f"{n_model} vs {n_baseline} seeds" + (" (Welch)" if method else "")


def signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def gflops_text(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def interval_text(low: float, high: float, digits: int = 2, signed_: bool = True) -> str:
    if math.isnan(low):
        return "-"
    show = signed if signed_ else (lambda v, d=digits: f"{v:.{d}f}")
    return f"[{show(low, digits)}, {show(high, digits)}]"


def speed_lines(ratios: pd.DataFrame) -> list[str]:
    """Each pair's speed ratio; a ratio that cannot be formed (no positive speed on a side) is left out."""
    lines = []
    for r in ratios.itertuples():
        if not math.isfinite(r.ratio):
            continue
        runs = f"{r.n_model} vs {r.n_baseline} runs"
        if math.isnan(r.low):
            interval = f" ({stats.ONE_SEED})"
        elif r.too_wide:
            interval = f"; its 95% interval is {TOO_WIDE} to mean anything ({runs})"
        else:
            interval = f", 95% interval {interval_text(r.low, r.high, 3, signed_=False)}x ({runs}): {r.verdict}"
        per_flop = (f"; per FLOP it runs at {r.per_flop_ratio:.2f}x ({gflops_text(r.model_gflops)} vs "
                    f"{gflops_text(r.baseline_gflops)} GFLOPs/image, {r.model_tflop_per_s:.3f} vs "
                    f"{r.baseline_tflop_per_s:.3f} TFLOP/s achieved)" if math.isfinite(r.per_flop_ratio) else "")
        lines.append(f"{r.model} trains at {r.ratio:.3f}x the speed of {r.baseline} ({SPEED_NAME}){interval}"
                     f"{per_flop}.")
    return lines


def gap_line(r: Any) -> str:
    """One accuracy gap in words, never without its verdict."""
    head = (f"At epoch {r.epoch}, {r.model} is {signed(r.gap)} points of test accuracy against {r.baseline} "
            f"({r.model_value:.2f}% vs {r.baseline_value:.2f}%")
    if math.isnan(r.low):
        return f"{head}; {seeds_text('', r.n_model, r.n_baseline)}): {r.verdict}."
    if r.too_wide:
        return (f"{head}; {seeds_text(r.method, r.n_model, r.n_baseline)}): its 95% interval is {TOO_WIDE} to "
                f"mean anything, {stats.NOT_DISTINGUISHABLE}.")
    return (f"{head}), 95% interval {interval_text(r.low, r.high)} "
            f"({seeds_text(r.method, r.n_model, r.n_baseline)}): {r.verdict}.")


SIZED_BY_LENGTH = (LENGTH, KNOB + "lr", SHOWN_AS_BATCH, "global_batch")  # a length and what it may size


def _apart_by_length(first: list[Group], second: list[Group]) -> bool:
    """Two sets of one recipe, run alike on the same data, kept apart only by their lengths (and the LR and
    batch the budget rule sizes from a length)."""
    return (_rest(first) == _rest(second) and first[0].length != second[0].length
            and not (first[0].epochs_are_runs and second[0].epochs_are_runs))


def _rest(members: list[Group]) -> tuple:
    return tuple((k, v) for k, v in members[0].conditions if k not in SIZED_BY_LENGTH)


def _by_length_line(sets: list[list[Group]]) -> str:
    lengths: dict[int, list[str]] = {}
    for members in sets:
        lengths.setdefault(members[0].length, []).extend(g.label for g in members)
    parts = [f"{n} epoch{'s' if n > 1 else ''}: {', '.join(labels)}" for n, labels in sorted(lengths.items())]
    return (f"Not compared, runs of one recipe at different lengths (a gap is read at the end of runs of equal "
            f"length): {'; '.join(parts)}.")


def not_compared_lines(groups: list[Group]) -> list[str]:
    """One line per pair of condition sets: who is not compared with whom, and what differs; nothing where
    two sets of one arch between them are compared as recipes or setups (all there is to compare). Sets of
    one recipe kept apart by their lengths share one line, however many lengths a sweep has."""
    lines: list[str] = []
    apart: dict[tuple, list[list[Group]]] = {}  # per recipe and everything but the length: its sets
    paired = {"recipe": recipe_pairs(groups), "setup": setup_pairs(groups)}
    for first, second in itertools.combinations(comparable_sets(groups), 2):
        what = "; ".join(differences(second[0], first[0]))
        members = {id(g) for g in first + second}
        kind = next((kind for kind, pairs in paired.items()
                     if any({id(model), id(baseline)} <= members for model, baseline in pairs)), None)
        if kind and len({g.arch for g in first + second}) == 1:
            continue
        if not kind and _apart_by_length(first, second):
            sets = apart.setdefault(_rest(first), [])
            sets += [s for s in (first, second) if not any(s is seen for seen in sets)]
            continue
        lead = f"Compared only arch by arch, as {kind} gaps" if kind else "Not compared"
        lines.append(f"{lead}: {', '.join(g.label for g in second)} with {', '.join(g.label for g in first)} "
                     f"({what}).")
    return [_by_length_line(sets) for sets in apart.values()] + lines


def best_epoch_lines(models: pd.DataFrame) -> list[str]:
    lines = []
    for m in models.itertuples():
        status = f", {m.incomplete} run(s) not finished" if m.incomplete else ""
        lines.append(f"{m.model}: best mean test accuracy {m.best_test_acc:.2f}% at epoch {m.best_epoch} of "
                     f"{m.epochs} ({m.runs} seed(s): {m.seeds}{status}).")
    return lines


def last_gap_lines(gaps: pd.DataFrame) -> list[str]:
    """Each pair's gap at the last epoch both reached."""
    if gaps.empty:
        return []
    last = gaps.loc[gaps.groupby(["model", "baseline"], sort=False)["epoch"].idxmax()]
    return [gap_line(r) for r in last.itertuples()]


def takeaways(groups: list[Group], models: pd.DataFrame, gaps: pd.DataFrame, ratios: pd.DataFrame,
              recipes: pd.DataFrame) -> list[str]:
    """Statements computed from the data: speed ratios, the model and recipe gaps at the last shared
    epoch, which models could not be compared, and best epochs."""
    lines = speed_lines(ratios) + last_gap_lines(gaps) + last_gap_lines(recipes)
    lines += not_compared_lines(groups)
    return lines + best_epoch_lines(models)


def notes(groups: list[Group], models: pd.DataFrame, left_out: int = 0) -> list[str]:
    """How the numbers were made: re-runs set aside, unresolved recipes, the speed definition, and the
    ``left_out`` pairs of a sweep's settings the per-epoch gaps do not show."""
    lines = []
    if left_out:
        lines.append(f"A sweep's settings are compared as the answer compares them, each against the best of them: "
                     f"the per-epoch gaps and takeaways leave out the {left_out} pair{'s' if left_out > 1 else ''} "
                     f"among the others (--every-pair shows them).")
    for group in groups:
        for seed in dict.fromkeys(r.seed for r in group.dropped):
            kept = next(r for r in group.runs if r.seed == seed)
            dropped = [str(r.folder) for r in group.dropped if r.seed == seed]
            why = "newest complete" if kept.complete else "newest; none finished"
            lines.append(f"Seed {seed} of {group.label} was run {len(dropped) + 1} times and counts once: kept "
                         f"{kept.folder} ({why}), not counted: {', '.join(dropped)}.")
    unresolved = [str(r.folder) for g in groups for r in g.runs + g.dropped if not r.recipe_resolved]
    if unresolved:
        lines.append(f"The recipe could not be resolved for {len(unresolved)} run(s) without {CONFIG_NAME} "
                     f"({', '.join(unresolved)}): they are grouped by recipe name only.")
    lines.append(f"Speed ({SPEED_NAME}) is the median over each run's epochs but the first of each process that "
                 "trained it (epoch 1, and the first after a resume: warm-up and compilation; the warm_up column), "
                 f"then mean ± std over seeds; the per-epoch values stay in each {CSV_NAME}.")
    single = [m.model for m in models.itertuples() if m.speed_with_warm_up]
    if single:
        lines.append(f"Runs with only warm-up epochs (a single epoch) take their speed from them, warm-up included: "
                     f"{', '.join(single)}.")
    stand_ins = dict.fromkeys(group.label for pair in recipe_pairs(groups) if pair[0].length != pair[1].length
                              for group in pair if group.epochs_are_runs)
    if stand_ins:
        lines.append(f"A constant LR and nothing sized by the run's length: epoch k of {', '.join(stand_ins)} is a "
                     "k-epoch run, so it stands for one beside runs of other lengths.")
    recipes = {tuple((k, v) for k, v in g.conditions if k == "recipe" or k.startswith(KNOB)) for g in groups}
    if len(recipes) > 1:
        lines.append("Train loss depends on the recipe (augmentation, label smoothing): read it within one "
                     "recipe only; it is never compared across recipes here.")
    return lines
