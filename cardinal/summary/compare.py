"""Step 3: numbers over seeds and gaps between groups, each with its 95% interval and verdict.

Models are compared only within one set of conditions. Recipes are compared one arch at a time: two
groups of one arch whose conditions differ only in the recipe (its name, knobs and batch), and only when
both runs have the same length: epoch k of a long run is never set against the end of a short one. The
exception proves the rule: where a recipe's LR is constant and nothing in it is sized by the run's length
(the reference study's ``seed``), epoch k of a long run *is* a k-epoch run, so it stands for one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cardinal import stats
from cardinal.summary.group import LENGTH, Group, comparable_sets
from cardinal.summary.load import (
    ACCURACIES,
    CSV_CONDITIONS,
    CUMULATIVE_TIME,
    KNOB,
    LOSSES,
    SETUP_KNOBS,
    SPEEDS,
    TIMES,
    Conditions,
)

# How a recipe is run: part of the recipe where two recipes differ (users run fast in bf16 + channels_last and
# the reference in fp32; the legend says so), a difference of setup within one recipe.
RUN_AS = ("precision", "channels_last")
RECIPE_CONDITIONS = ("recipe", "recipe_resolved", "global_batch", *RUN_AS)  # with every KNOB: what a recipe decides
BASELINE_RECIPE = "seed"  # the reference study's recipe: the baseline of every recipe gap it is part of
Pair = tuple[Group, Group]  # (model, baseline): a gap is model - baseline
SWEEP_SIZE = 3  # settings compared with one another from which the answer sets each against the best only
ACCURACY_LIMITS = (0.0, 100.0)
GAP_LIMITS = (-100.0, 100.0)
GAP_COLUMNS = ["model", "baseline", "epoch", "metric", "model_value", "baseline_value", "gap", "low", "high",
               "method", "n_model", "n_baseline", "verdict", "too_wide"]


class Ended(NamedTuple):
    """A pair compared at the end of both runs, with the epoch it is compared at."""

    model: Group
    baseline: Group
    epoch: int


# -------------------------------------------------------------------------------------------- results
def _reported_epochs(group: Group, epochs: Sequence[int] | None) -> list[int]:
    return sorted(set(epochs) if epochs else {1, 5, group.last_epoch()})


def _condition_columns(group: Group) -> dict[str, Any]:
    """What the group ran under, the recipe's every knob included (``recipe.lr``, ...): a sweep read as a
    frame pivots on them."""
    conditions = dict(group.conditions)
    return {"model": group.label, "arch": group.arch, "dataset": conditions["dataset"],
            "recipe": group.recipe_name, "recipe_resolved": conditions["recipe_resolved"],
            **{c: conditions[c] for c in CSV_CONDITIONS},
            **{c: v for c, v in conditions.items() if c.startswith(KNOB) or c in SETUP_KNOBS}}


def _aggregate(row: dict[str, Any], column: str, values: Iterable[float]) -> stats.Estimate:
    summary = stats.estimate(list(values))
    row[column], row[f"{column}_std"], row[f"{column}_ci95"] = summary.mean, summary.std, summary.ci95
    return summary


def results_table(groups: list[Group], epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per group and reported epoch: every metric as mean, std and 95% half-width over seeds."""
    metrics = [c for c in ACCURACIES + LOSSES + SPEEDS + TIMES + (CUMULATIVE_TIME,)
               if any(c in r.frame for g in groups for r in g.runs)]
    rows = []
    for group in groups:
        for epoch in _reported_epochs(group, epochs):
            at = group.at_epoch(epoch)
            if not at:
                continue
            row = {**_condition_columns(group), "epoch": epoch, "runs": len(at),
                   "seeds": " ".join(str(seed) for seed, _ in at)}
            for column in metrics:
                _aggregate(row, column, [r.get(column, math.nan) for _, r in at])
            rows.append(row)
    return pd.DataFrame(rows)


def models_table(groups: list[Group]) -> pd.DataFrame:
    """Per group: size, arithmetic, steady-state speed over seeds, best epoch, and what was set aside."""
    rows = []
    for group in groups:
        frames = pd.concat([r.frame[["epoch", "test_acc"]] for r in group.runs])
        per_epoch = frames.groupby("epoch")["test_acc"].mean()
        row = {**_condition_columns(group), "params": group.first_value("params"),
               "gflops": group.first_value("gflops")}
        for column in SPEEDS:
            _aggregate(row, f"median_{column}", group.medians(column))
        row.update({
            "speed_with_warm_up": sum(r.speed_includes_warm_up for r in group.runs),
            "best_epoch": int(per_epoch.idxmax()), "best_test_acc": float(per_epoch.max()),
            "epochs": group.last_epoch(), "runs": len(group.runs),
            "seeds": " ".join(str(s) for s in group.seeds),
            "incomplete": sum(not r.complete for r in group.runs), "dropped": len(group.dropped),
        })
        rows.append(row)
    return pd.DataFrame(rows)


def final_table(groups: list[Group]) -> pd.DataFrame:
    """Per group, in the order given: test accuracy at the last epoch (over the runs that reached it), its
    95% half-width (NaN below 2 seeds), whether that interval is too wide to mean anything, and the mean
    steady-state img/s; then a row per shorter length its epochs stand for in a recipe gap (``stand_in``:
    epoch k of a constant-LR run set against a k-epoch run, itself a finished k-epoch run), so both sides
    of every gap are in the table."""
    index = {id(g): i for i, g in enumerate(groups)}
    ends = [(group, group.last_epoch(), False) for group in groups]
    ends += [(group, epoch, True) for group, epoch in _stand_ins(groups)]
    rows = []
    for group, epoch, stand_in in ends:
        at = group.at_epoch(epoch)
        row = {"group": index[id(group)], "model": group.label, "epoch": epoch, "length": group.length,
               "finished": stand_in or group.finished(), "stand_in": stand_in, "runs": len(at)}
        accuracy = _aggregate(row, "test_acc", [r["test_acc"] for _, r in at])
        row["test_acc_too_wide"] = stats.too_wide(accuracy.mean - accuracy.ci95, accuracy.mean + accuracy.ci95,
                                                  *ACCURACY_LIMITS)
        _aggregate(row, "img_per_s", group.medians("img_per_s"))
        rows.append(row)
    return pd.DataFrame(rows)


def _stand_ins(groups: list[Group]) -> list[tuple[Group, int]]:
    """(group, k) for each epoch k at which a constant-LR group is set against k-epoch runs in a recipe gap,
    short of its own end; in the order of the groups, then of k."""
    found = {(id(g), pair.epoch): g for pair in _ended(recipe_pairs(groups)) for g in (pair.model, pair.baseline)
             if g.epochs_are_runs and pair.epoch < g.last_epoch()}
    order = {id(g): i for i, g in enumerate(groups)}
    ranked = sorted(found.items(), key=lambda item: (order[item[0][0]], item[0][1]))
    return [(group, epoch) for (_, epoch), group in ranked]


# ---------------------------------------------------------------------------------------------- pairs
def arch_pairs(groups: list[Group]) -> list[Pair]:
    """(model, baseline): every later group against every earlier one of the same set of conditions."""
    return [(model, baseline) for members in comparable_sets(groups)
            for baseline, model in itertools.combinations(members, 2)]


def setup_conditions(group: Group) -> Conditions:
    """A group's conditions less those its recipe decides: what two recipes must share to be compared."""
    return tuple((k, v) for k, v in group.conditions
                 if k not in RECIPE_CONDITIONS and (not k.startswith(KNOB) or k == LENGTH))


def _run_as(group: Group) -> Conditions:
    return tuple((k, v) for k, v in group.conditions if k in RUN_AS)


def _recipe_key(group: Group) -> tuple[str, Conditions]:
    """What two recipes must share to be compared, but the length: arch and setup."""
    return group.arch, tuple((k, v) for k, v in setup_conditions(group) if k != LENGTH)


def end_epoch(model: Group, baseline: Group) -> int | None:
    """The epoch at which two groups are set side by side as whole runs: their common length; or, where one
    recipe's epochs are runs of their own (a constant LR, nothing sized by length), the other's length once
    it reached it; None when neither holds (epoch k of a long run never stands for the end of a short one)."""
    if model.length == baseline.length:
        return model.length
    if model.epochs_are_runs and baseline.epochs_are_runs:
        return min(model.last_epoch(), baseline.last_epoch())
    for short, long in ((model, baseline), (baseline, model)):
        if long.epochs_are_runs and not short.epochs_are_runs and long.at_epoch(short.length):
            return short.length
    return None


def recipe_pairs(groups: list[Group]) -> list[Pair]:
    """(model, baseline): groups of one arch and one setup that differ in the recipe only (two recipes of
    different names may run in different precisions), of one length, or one of them a recipe whose epochs are
    runs of their own that stands for the other's length (see ``end_epoch``; one such group per recipe, none
    where one of the same length is there, else the one with most seeds at that epoch). The reference recipe is
    the baseline when it is one of the two, else the group that appears first."""
    by_setup: dict[tuple[str, Conditions], list[Group]] = {}
    for group in groups:
        by_setup.setdefault(_recipe_key(group), []).append(group)
    pairs: list[Pair] = []
    for members in by_setup.values():
        stand_ins: dict[tuple[int, Conditions], tuple[int, Group, Group]] = {}  # (fixed, free recipe): best
        for first, second in itertools.combinations(members, 2):
            if first.recipe_name == second.recipe_name and _run_as(first) != _run_as(second):
                continue
            if _unsized(first) == _unsized(second):  # one recipe, two lengths: not a recipe gap
                continue
            epoch = end_epoch(first, second)
            if epoch is None:
                continue
            swap = second.recipe_name == BASELINE_RECIPE and first.recipe_name != BASELINE_RECIPE
            model, baseline = (first, second) if swap else (second, first)
            if model.length == baseline.length or (model.epochs_are_runs and baseline.epochs_are_runs):
                pairs.append((model, baseline))
                continue
            fixed, free = (model, baseline) if baseline.epochs_are_runs else (baseline, model)
            slot = (id(fixed), _unsized(free))
            seeds = len(free.at_epoch(epoch))
            if slot not in stand_ins or seeds > stand_ins[slot][0]:
                stand_ins[slot] = (seeds, model, baseline)
        matched = {(id(g), _unsized(h)) for pair in pairs for g, h in (pair, pair[::-1])}
        pairs += [(model, baseline) for slot, (_, model, baseline) in stand_ins.items() if slot not in matched]
    return pairs


def _unsized(group: Group) -> Conditions:
    """A group's conditions less its length."""
    return tuple((k, v) for k, v in group.conditions if k != LENGTH)


HOW_RUN = ("compiled", *RUN_AS)  # how one recipe was run: whether that changes its result is a question too


def setup_pairs(groups: list[Group]) -> list[Pair]:
    """(model, baseline): groups of one arch, one resolved recipe and one length that differ only in how they
    were run (compilation, precision, memory format), the group that appears first as the baseline."""
    by_rest: dict[tuple[str, int, Conditions], list[Group]] = {}
    for group in groups:
        rest = tuple((k, v) for k, v in group.conditions if k not in HOW_RUN)
        by_rest.setdefault((group.arch, group.length, rest), []).append(group)
    return [(second, first) for members in by_rest.values() for first, second in itertools.combinations(members, 2)]


# ----------------------------------------------------------------------------------------------- gaps
def gap_row(model: Group, baseline: Group, epoch: int, metric: str = "test_acc") -> dict[str, Any]:
    """model - baseline at ``epoch`` in points: paired by seed when both ran the same seeds, Welch otherwise."""
    a, b = model.at_epoch(epoch), baseline.at_epoch(epoch)
    interval = stats.gap_interval([r[metric] for _, r in a], [r[metric] for _, r in b],
                                  [s for s, _ in a], [s for s, _ in b])
    return {"model": model.label, "baseline": baseline.label, "epoch": epoch, "metric": metric,
            "model_value": float(np.mean([r[metric] for _, r in a])),
            "baseline_value": float(np.mean([r[metric] for _, r in b])),
            "gap": interval.estimate, "low": interval.low, "high": interval.high, "method": interval.method,
            "n_model": interval.n_a, "n_baseline": interval.n_b, "verdict": interval.verdict,
            "too_wide": stats.too_wide(interval.low, interval.high, *GAP_LIMITS)}


def gap_table(pairs: list[Pair], results: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Per (model, baseline) pair and epoch both report: see ``gap_row``."""
    rows = []
    for model, baseline in pairs if not results.empty else []:
        if model.length != baseline.length and not (model.epochs_are_runs and baseline.epochs_are_runs):
            # one's epochs are runs of their own: set beside the other's end only
            rows.append(gap_row(model, baseline, end_epoch(model, baseline), metric))
            continue
        shared = set(results.loc[results["model"] == model.label, "epoch"]) & set(
            results.loc[results["model"] == baseline.label, "epoch"])
        rows += [gap_row(model, baseline, epoch, metric) for epoch in sorted(shared)]
    return pd.DataFrame(rows, columns=GAP_COLUMNS)


def speed_row(model: Group, baseline: Group) -> dict[str, Any]:
    """The ratio of steady-state img/s with its 95% interval, and the ratio per FLOP."""
    speed = stats.ratio_interval(model.medians("img_per_s"), baseline.medians("img_per_s"))
    tflops = (model.medians("train_tflop_per_s"), baseline.medians("train_tflop_per_s"))
    return {"model": model.label, "baseline": baseline.label, "ratio": speed.estimate, "low": speed.low,
            "high": speed.high, "verdict": speed.verdict, "too_wide": stats.ratio_too_wide(speed, 3),
            "n_model": speed.n_a, "n_baseline": speed.n_b,
            "per_flop_ratio": stats.ratio_interval(*tflops).estimate,
            "model_gflops": model.first_value("gflops"), "baseline_gflops": baseline.first_value("gflops"),
            "model_tflop_per_s": float(np.mean(tflops[0])), "baseline_tflop_per_s": float(np.mean(tflops[1]))}


def speed_ratios(pairs: list[Pair]) -> pd.DataFrame:
    """Per pair of models under identical conditions (``arch_pairs``): see ``speed_row``."""
    return pd.DataFrame([speed_row(model, baseline) for model, baseline in pairs])


def _mean_at(group: Group, epoch: int, metric: str = "test_acc") -> float:
    return float(np.mean([r[metric] for _, r in group.at_epoch(epoch)]))


def _families(pairs: list[Ended]) -> list[list[Ended]]:
    """The pairs split into families: groups compared with one another at one epoch, linked by pairs."""
    families: list[tuple[int, set[int], list[Ended]]] = []  # (epoch, group ids, pairs)
    for pair in pairs:
        ids = {id(pair.model), id(pair.baseline)}
        linked = [f for f in families if f[0] == pair.epoch and f[1] & ids]
        families = [f for f in families if not any(f is g for g in linked)]
        families.append((pair.epoch, ids.union(*(f[1] for f in linked)), [p for f in linked for p in f[2]] + [pair]))
    return [sorted(family, key=pairs.index) for _, _, family in families]


def _against_the_best(pairs: list[Ended], kind: str) -> tuple[list[Ended], set[tuple[int, int]]]:
    """A sweep's answer: where SWEEP_SIZE or more settings were each compared with every other at one epoch,
    each against the best of them (n - 1 gaps that say which settings the best is surely ahead of, where all
    pairs would be n (n - 1) / 2). Recipe pairs with the reference recipe stay as they are. Returns the pairs
    and the ids of those set against a best (``shown_pairs`` sets the per-epoch tables the same way)."""
    kept: list[Ended] = []
    against_best: set[tuple[int, int]] = set()
    for family in _families(pairs):
        groups = list({id(g): g for pair in family for g in (pair.model, pair.baseline)}.values())
        others = [g for g in groups if kind != "recipe" or g.recipe_name != BASELINE_RECIPE]
        complete = len(family) == len(groups) * (len(groups) - 1) // 2
        if not complete or len(others) < SWEEP_SIZE:
            kept += family
            continue
        epoch = family[0].epoch
        best = max(others, key=lambda g: _mean_at(g, epoch))  # the first of equals
        swept_ids = {id(g) for g in others}
        kept += [p for p in family if not {id(p.model), id(p.baseline)} <= swept_ids]
        swept = [Ended(best, g, epoch) for g in sorted(others, key=lambda g: -_mean_at(g, epoch)) if g is not best]
        kept += swept
        against_best |= {(id(p.model), id(p.baseline)) for p in swept}
    return kept, against_best


def _ended(pairs: list[Pair]) -> list[Ended]:
    """The pairs that can be set side by side at the end of both runs, with that epoch."""
    return [Ended(m, b, epoch) for m, b in pairs if (epoch := end_epoch(m, b)) is not None
            and all(g.finished() or g.length > epoch for g in (m, b))]


def _kinds(groups: list[Group]) -> list[tuple[str, list[Pair]]]:
    return [("arch", arch_pairs(groups)), ("recipe", recipe_pairs(groups)), ("setup", setup_pairs(groups))]


def _key(model: Group, baseline: Group) -> frozenset[int]:
    return frozenset((id(model), id(baseline)))


def shown_pairs(pairs: list[Pair], kind: str) -> list[Pair]:
    """The pairs of the per-epoch tables and takeaways: as the answer sets them (a sweep's settings each
    against its best, best first), and every pair the answer cannot set at an end (unfinished, or of other
    lengths); a sweep's pairs among its other settings are left out."""
    ended = _ended(pairs)
    kept, _ = _against_the_best(ended, kind)
    answered = {_key(p.model, p.baseline): (p.model, p.baseline) for p in kept}
    left_out = {_key(p.model, p.baseline) for p in ended} - answered.keys()
    return [answered.get(_key(*pair), pair) for pair in pairs if _key(*pair) not in left_out]


def final_gaps(groups: list[Group]) -> pd.DataFrame:
    """Arch against arch within one recipe, recipe against recipe within one arch, then one recipe run two
    ways, each at the end of two finished groups of the same length, with the speed ratio beside the gap; a
    sweep's settings against its best (``_against_the_best``, the ``against_best`` column)."""
    index = {id(g): i for i, g in enumerate(groups)}
    rows = []
    for kind, pairs in _kinds(groups):
        kept, against_best = _against_the_best(_ended(pairs), kind)
        for model, baseline, epoch in kept:
            speed = speed_row(model, baseline)
            rows.append({**gap_row(model, baseline, epoch), "kind": kind,
                         "model_index": index[id(model)], "baseline_index": index[id(baseline)],
                         "ratio": speed["ratio"], "ratio_verdict": speed["verdict"],
                         "ratio_too_wide": speed["too_wide"],
                         "against_best": (id(model), id(baseline)) in against_best})
    columns = GAP_COLUMNS + ["kind", "model_index", "baseline_index", "ratio", "ratio_verdict", "ratio_too_wide",
                             "against_best"]
    return pd.DataFrame(rows, columns=columns).sort_values("epoch", ascending=False, kind="stable")
