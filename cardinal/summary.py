"""Compare runs: which runs are replicates, how far apart the models are, and how sure that is.

    python -m cardinal.summary                         # every run under runs/
    python -m cardinal.summary runs/study --epochs 1 5 10 --format markdown --output study.md
    python -m cardinal.summary runs/study --plot study.png

A group is every run of one arch under identical conditions: dataset, resolved recipe (every knob, read
from the run's config.json), precision, memory format, compilation, global batch, world size, device and
data size. Runs of a group that differ only in seed are replicates and are aggregated (mean, std, 95%
interval); a re-run of a seed counts once. Models are compared only within one set of conditions, each
accuracy gap with its 95% interval and a verdict. Recipes are compared the same way, one arch at a time:
two groups of one arch whose conditions differ only in the recipe (its name, knobs and batch). Speed is
the median over epochs 2..N of each run.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from cardinal import stats
from cardinal.cli import ArgumentParser, CardinalError, positive_int, run
from cardinal.fileio import write_text_atomic
from cardinal.plotting import pyplot, save_figure
from cardinal.records import CONFIG_NAME, CSV_NAME, steady_state

REQUIRED = ("epoch", "test_acc", "img_per_s", "arch", "seed")
ACCURACIES = ("test_acc", "val_acc", "test_acc_ema", "test_acc_tta")  # every one optional but test_acc
LOSSES = ("train_loss", "train_objective", "test_loss", "val_loss")
SPEEDS = ("img_per_s", "it_per_s", "train_tflop_per_s")
TIMES = ("epoch_time_s", "train_time_s")
NUMERIC = ACCURACIES + LOSSES + SPEEDS + TIMES + ("params", "gflops", "train_images", "test_images")
CUMULATIVE_TIME = "train_time_cum_s"  # sum of train_time_s up to the epoch: the honest x-axis for speed
# Conditions read from the CSV (what ran), then from config.json (what was asked), in label order.
CSV_CONDITIONS = ("precision", "channels_last", "compiled", "global_batch", "world_size", "device",
                  "train_images", "test_images")
SETUP_KNOBS = ("grad_accum", "sync_bn", "init_weights", "limit_batches")  # change what an epoch computes
KNOB = "recipe."  # prefix of resolved recipe knobs among the conditions
SHOWN_AS_BATCH = KNOB + "batch_size"  # the CSV's global_batch names it
RECIPE_CONDITIONS = ("recipe", "recipe_resolved", "global_batch")  # with every KNOB: what a recipe decides
BASELINE_RECIPE = "seed"  # the reference study's recipe: the baseline of every recipe gap it is part of
SPEED_NAME = "median img/s, epochs 2+"

Conditions = tuple[tuple[str, Any], ...]


# ----------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One run folder: its epochs and everything that decides what it can be compared with."""

    csv: Path
    frame: pd.DataFrame
    arch: str
    seed: Any
    conditions: Conditions
    planned_epochs: int | None
    mtime: float

    @property
    def folder(self) -> Path:
        return self.csv.parent

    @property
    def recipe_resolved(self) -> bool:
        return dict(self.conditions)["recipe_resolved"]

    @property
    def last_epoch(self) -> int:
        return int(self.frame["epoch"].max())

    @property
    def complete(self) -> bool:
        """Reached its planned epochs (a run without config.json cannot tell, and counts as complete)."""
        return self.planned_epochs is None or self.last_epoch >= self.planned_epochs

    def median_speed(self, column: str) -> float:
        """Steady-state speed: the median over epochs 2..N (records.steady_state decides the rule)."""
        return steady_state(self.frame, column) if column in self.frame else math.nan


def find_csvs(paths: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(CSV_NAME)))
        else:
            raise CardinalError(f"{path} does not exist")
    unique = {csv.resolve(): csv for csv in found}  # a run named twice (runs runs/x) counts once
    return list(unique.values())


def _plain(value: Any) -> Any:
    """A hashable Python value from a CSV cell or JSON field (numpy scalars, lists, 'True', 256.0)."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return int(value) if value.is_integer() else value
    if value in ("True", "False"):
        return value == "True"
    return value


def _column_value(frame: pd.DataFrame, column: str) -> Any:
    """The run's value of a per-run column; several values (a resume elsewhere) are all kept."""
    if column not in frame:
        return None
    if column == "train_images":  # the last epoch of a run stopped mid-epoch is short
        return _plain(frame[column].iloc[0])
    values = list(dict.fromkeys(_plain(v) for v in frame[column]))
    return values[0] if len(values) == 1 else tuple(values)


def read_config(csv: Path) -> dict[str, Any] | None:
    path = csv.parent / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("recipe"), dict) else None


def run_conditions(frame: pd.DataFrame, config: dict[str, Any] | None) -> Conditions:
    """Everything but arch and seed that must match for two runs to be compared."""
    recipe_name = _column_value(frame, "recipe")
    conditions: list[tuple[str, Any]] = [("dataset", _column_value(frame, "dataset"))]
    if config is not None:
        conditions.append(("recipe", config.get("recipe_name", recipe_name)))
        conditions.append(("recipe_resolved", True))
        conditions += [(KNOB + k, _plain(v)) for k, v in sorted(config["recipe"].items())]
    else:
        conditions += [("recipe", recipe_name), ("recipe_resolved", False)]
    conditions += [(c, _column_value(frame, c)) for c in CSV_CONDITIONS]
    if config is not None:
        conditions += [(k, _plain(config.get(k))) for k in SETUP_KNOBS]
    return tuple(conditions)


def read_run(csv: Path) -> Run:
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise CardinalError(f"cannot read {csv}: {str(error).splitlines()[0] if str(error) else 'empty'}") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise CardinalError(f"{csv} is not a cardinal epochs CSV (missing columns: {', '.join(missing)})")
    if frame.empty:
        raise CardinalError(f"{csv} holds no epochs yet")
    numeric = [c for c in NUMERIC if c in frame.columns]
    try:
        frame["epoch"] = frame["epoch"].astype(int)
        frame[numeric] = frame[numeric].astype(float)
    except (ValueError, TypeError):
        raise CardinalError(f"{csv} has non-numeric values in its metric columns") from None
    frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    time_column = "train_time_s" if "train_time_s" in frame and frame["train_time_s"].notna().all() else "epoch_time_s"
    frame[CUMULATIVE_TIME] = frame[time_column].cumsum() if time_column in frame else math.nan
    config = read_config(csv)
    try:
        planned = int(config["recipe"]["epochs"]) if config else None
    except (KeyError, TypeError, ValueError):
        planned = None
    return Run(csv=csv, frame=frame, arch=str(_column_value(frame, "arch")), seed=_column_value(frame, "seed"),
               conditions=run_conditions(frame, config), planned_epochs=planned, mtime=csv.stat().st_mtime)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    csvs = find_csvs(paths)
    if not csvs:
        raise CardinalError(f"no {CSV_NAME} found under {', '.join(str(p) for p in paths)}")
    return [read_run(csv) for csv in csvs]


# --------------------------------------------------------------------------------------------- groups
@dataclass
class Group:
    """Runs of one arch under identical conditions, one per seed; ``dropped`` holds re-runs of a seed."""

    arch: str
    conditions: Conditions
    runs: list[Run]
    dropped: list[Run] = field(default_factory=list)
    label: str = ""

    @property
    def recipe_name(self) -> str:
        name = dict(self.conditions)["recipe"]
        return "?" if name is None else str(name)

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def at_epoch(self, epoch: int) -> list[tuple[Any, pd.Series]]:
        """(seed, row) of every run that reached ``epoch``."""
        return [(r.seed, r.frame[r.frame["epoch"] == epoch].iloc[0]) for r in self.runs
                if (r.frame["epoch"] == epoch).any()]

    def last_epoch(self) -> int:
        return max(r.last_epoch for r in self.runs)

    def medians(self, column: str) -> list[float]:
        """Each run's steady-state speed (see Run.median_speed)."""
        return [r.median_speed(column) for r in self.runs]

    def first_value(self, column: str) -> float:
        values = [r.frame[column].iloc[0] for r in self.runs if column in r.frame]
        return float(values[0]) if values else math.nan


def keep_one_per_seed(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """Seeds are replicates, re-runs are not: per seed keep the newest complete run (else the newest)."""
    by_seed: dict[Any, list[Run]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    kept, dropped = [], []
    for candidates in by_seed.values():
        best = max(candidates, key=lambda r: (r.complete, r.mtime))
        kept.append(best)
        dropped += [r for r in candidates if r is not best]
    return kept, dropped


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in order of first appearance, labelled by what tells them apart."""
    grouped: dict[tuple[str, Conditions], list[Run]] = {}
    for r in runs:
        grouped.setdefault((r.arch, r.conditions), []).append(r)
    groups = []
    for (arch, conditions), members in grouped.items():
        kept, dropped = keep_one_per_seed(members)
        groups.append(Group(arch, conditions, kept, dropped))
    groups = [g for members in comparable_sets(groups) for g in members]  # comparable models side by side
    for group, label in zip(groups, group_labels(groups)):
        group.label = label
    return groups


# --------------------------------------------------------------------------------------------- labels
def _number(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, tuple):
        return "/".join(_number(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def label_part(name: str, value: Any) -> str:
    """How one condition reads inside a model label: 'bf16', 'lr=0.05', 'batch 256'."""
    if name.startswith(KNOB) or name in SETUP_KNOBS:
        return f"{name.removeprefix(KNOB)}={_number(value)}"
    if value is None:
        return f"{CONDITION_NAMES.get(name, name)} ?"
    if name == "precision":
        return "fp32" if value == "no" else str(value)
    if name == "channels_last":
        return {True: "channels_last", False: "NCHW"}.get(value, f"memory {value}")
    if name == "compiled":
        return {True: "compiled", False: "eager"}.get(value, f"compiled {value}")
    if name == "global_batch":
        return f"batch {_number(value)}"
    if name == "world_size":
        return f"{_number(value)} process" + ("" if value == 1 else "es")
    if name == "train_images":
        return f"{_number(value)} train img"
    if name == "test_images":
        return f"{_number(value)} test img"
    return _number(value)


def _varies(name: str, peers: list[Group]) -> bool:
    return len({repr(dict(p.conditions).get(name)) for p in peers}) > 1


def group_labels(groups: list[Group]) -> list[str]:
    """'arch (recipe)' plus every condition that varies between the groups, so that equal labels never
    hide different conditions; a recipe knob is named when it varies within one recipe name."""
    resolved = [g for g in groups if dict(g.conditions)["recipe_resolved"]]
    labels = []
    for group in groups:
        family = [g for g in resolved if g.recipe_name == group.recipe_name]
        parts = [group.recipe_name]
        if group not in resolved and family:
            parts.append("recipe unresolved")
        for name, value in group.conditions:
            if name in ("recipe", "recipe_resolved", SHOWN_AS_BATCH):
                continue
            if name.startswith(KNOB):
                peers = family
            elif name == "global_batch":  # the recipe's name says it, unless one recipe ran at two batches
                peers = [g for g in groups if g.recipe_name == group.recipe_name]
            else:
                peers = resolved if name in SETUP_KNOBS else groups
            if _varies(name, peers):
                parts.append(label_part(name, value))
        labels.append(f"{group.arch} ({', '.join(parts)})")
    counts, seen, unique = Counter(labels), Counter(), []
    for label in labels:  # last resort: conditions that print alike (0.1 and "0.1")
        seen[label] += 1
        unique.append(label if counts[label] == 1 else f"{label} #{seen[label]}")
    return unique


CONDITION_NAMES = {
    "dataset": "dataset", "recipe": "recipe", "precision": "precision", "channels_last": "memory format",
    "compiled": "compilation", "global_batch": "global batch", "world_size": "world size",
    "device": "device", "train_images": "training images per epoch", "test_images": "test images",
}


def differences(a: Group, b: Group) -> list[str]:
    """What keeps two groups apart, in words: 'precision bf16 vs fp32', 'lr 0.05 vs 0.01'."""
    first, second = dict(a.conditions), dict(b.conditions)
    if not (first["recipe_resolved"] and second["recipe_resolved"]):
        unresolved = [g.label for g, c in ((a, first), (b, second)) if not c["recipe_resolved"]]
        said = [f"the recipe of {' and '.join(unresolved)} could not be resolved (no {CONFIG_NAME})"]
        first = {k: v for k, v in first.items() if not k.startswith(KNOB) and k not in SETUP_KNOBS}
        second = {k: v for k, v in second.items() if not k.startswith(KNOB) and k not in SETUP_KNOBS}
    else:
        said = []
    same_recipe = first.get("recipe") == second.get("recipe")
    for name in dict.fromkeys(list(first) + list(second)):
        if name in ("recipe_resolved", SHOWN_AS_BATCH) or first.get(name) == second.get(name):
            continue
        if name.startswith(KNOB) and not same_recipe:
            continue  # 'recipe fast vs seed' already says it
        values = (first.get(name), second.get(name))
        if name in ("precision", "channels_last", "compiled"):
            shown = [label_part(name, v) for v in values]
        else:
            shown = [_number(v) for v in values]
        said.append(f"{CONDITION_NAMES.get(name, name.removeprefix(KNOB))} {shown[0]} vs {shown[1]}")
    return said


# -------------------------------------------------------------------------------------------- results
def _reported_epochs(group: Group, epochs: Sequence[int] | None) -> list[int]:
    return sorted(set(epochs) if epochs else {1, 5, group.last_epoch()})


def _condition_columns(group: Group) -> dict[str, Any]:
    conditions = dict(group.conditions)
    return {"model": group.label, "arch": group.arch, "dataset": conditions["dataset"],
            "recipe": group.recipe_name, "recipe_resolved": conditions["recipe_resolved"],
            **{c: conditions[c] for c in CSV_CONDITIONS}}


def _aggregate(row: dict[str, Any], column: str, values: Iterable[float]) -> None:
    summary = stats.estimate(list(values))
    row[column], row[f"{column}_std"], row[f"{column}_ci95"] = summary.mean, summary.std, summary.ci95


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
        per_epoch = pd.concat([r.frame[["epoch", "test_acc"]] for r in group.runs]).groupby("epoch")["test_acc"].mean()
        best_epoch = int(per_epoch.idxmax()) if per_epoch.notna().any() else group.last_epoch()
        row = {**_condition_columns(group), "params": group.first_value("params"),
               "gflops": group.first_value("gflops")}
        for column in SPEEDS:
            _aggregate(row, f"median_{column}", group.medians(column))
        row.update({
            "speed_from_epoch_1": sum(r.last_epoch == 1 for r in group.runs),
            "best_epoch": best_epoch, "best_test_acc": float(per_epoch.max()),
            "epochs": group.last_epoch(), "runs": len(group.runs),
            "seeds": " ".join(str(s) for s in group.seeds),
            "incomplete": sum(not r.complete for r in group.runs), "dropped": len(group.dropped),
        })
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------- comparisons
def comparable_sets(groups: list[Group]) -> list[list[Group]]:
    """Groups measured under identical conditions (they differ in arch only), in order of appearance."""
    sets: dict[Conditions, list[Group]] = {}
    for group in groups:
        sets.setdefault(group.conditions, []).append(group)
    return list(sets.values())


def _pairs(groups: list[Group]) -> Iterable[tuple[Group, Group]]:
    """(model, baseline): every later group against every earlier one of the same set."""
    for members in comparable_sets(groups):
        for baseline, model in itertools.combinations(members, 2):
            yield model, baseline


def setup_conditions(group: Group) -> Conditions:
    """A group's conditions less those its recipe decides: what two recipes must share to be compared."""
    return tuple((k, v) for k, v in group.conditions if k not in RECIPE_CONDITIONS and not k.startswith(KNOB))


def recipe_pairs(groups: list[Group]) -> list[tuple[Group, Group]]:
    """(model, baseline): groups of one arch and one setup that differ in the recipe only. The reference
    recipe is the baseline when it is one of the two, else the group that appears first."""
    by_setup: dict[tuple[str, Conditions], list[Group]] = {}
    for group in groups:
        by_setup.setdefault((group.arch, setup_conditions(group)), []).append(group)
    pairs = []
    for members in by_setup.values():
        for first, second in itertools.combinations(members, 2):
            swap = second.recipe_name == BASELINE_RECIPE and first.recipe_name != BASELINE_RECIPE
            pairs.append((first, second) if swap else (second, first))
    return pairs


def accuracy_gaps(groups: list[Group], results: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Per comparable pair of models and reported epoch: see ``gap_table``."""
    return gap_table(list(_pairs(groups)), results, metric)


def recipe_gaps(groups: list[Group], results: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Per pair of recipes on one arch and setup, and reported epoch: see ``gap_table``."""
    return gap_table(recipe_pairs(groups), results, metric)


def gap_table(pairs: list[tuple[Group, Group]], results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (model, baseline) pair and reported epoch: model - baseline in points, its 95% interval and
    verdict (paired by seed when both ran the same seeds, Welch otherwise)."""
    rows = []
    for model, baseline in pairs if not results.empty else []:
        shared = set(results.loc[results["model"] == model.label, "epoch"]) & set(
            results.loc[results["model"] == baseline.label, "epoch"])
        for epoch in sorted(shared):
            a, b = model.at_epoch(epoch), baseline.at_epoch(epoch)
            interval = stats.gap_interval([r[metric] for _, r in a], [r[metric] for _, r in b],
                                          [s for s, _ in a], [s for s, _ in b])
            rows.append({"model": model.label, "baseline": baseline.label, "epoch": epoch, "metric": metric,
                         "model_value": float(np.mean([r[metric] for _, r in a])),
                         "baseline_value": float(np.mean([r[metric] for _, r in b])),
                         "gap": interval.estimate, "low": interval.low, "high": interval.high,
                         "method": interval.method, "n_model": interval.n_a, "n_baseline": interval.n_b,
                         "verdict": interval.verdict})
    return pd.DataFrame(rows, columns=["model", "baseline", "epoch", "metric", "model_value", "baseline_value",
                                       "gap", "low", "high", "method", "n_model", "n_baseline", "verdict"])


def speed_ratios(groups: list[Group]) -> pd.DataFrame:
    """Per comparable pair: the ratio of median img/s (epochs 2+) with its 95% interval, and per FLOP."""
    rows = []
    for model, baseline in _pairs(groups):
        speed = stats.ratio_interval(model.medians("img_per_s"), baseline.medians("img_per_s"))
        tflops = (model.medians("train_tflop_per_s"), baseline.medians("train_tflop_per_s"))
        rows.append({"model": model.label, "baseline": baseline.label, "ratio": speed.estimate,
                     "low": speed.low, "high": speed.high, "verdict": speed.verdict,
                     "n_model": speed.n_a, "n_baseline": speed.n_b,
                     "per_flop_ratio": stats.ratio_interval(*tflops).estimate,
                     "model_gflops": model.first_value("gflops"), "baseline_gflops": baseline.first_value("gflops"),
                     "model_tflop_per_s": float(np.mean(tflops[0])), "baseline_tflop_per_s": float(np.mean(tflops[1]))})
    return pd.DataFrame(rows)


def _seeds_text(method: str, n_model: int, n_baseline: int) -> str:
    if method == "paired":
        return f"paired, {n_model} seeds"
    return f"{n_model} vs {n_baseline} seeds" + (" (Welch)" if method else "")


def _signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def _gflops(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _interval_text(low: float, high: float, digits: int = 2, signed: bool = True) -> str:
    if math.isnan(low):
        return "-"
    show = _signed if signed else (lambda v, d=digits: f"{v:.{d}f}")
    return f"[{show(low, digits)}, {show(high, digits)}]"


# ------------------------------------------------------------------------------------------ takeaways
def speed_lines(ratios: pd.DataFrame) -> list[str]:
    lines = []
    for r in ratios.itertuples():
        interval = (f", 95% interval {_interval_text(r.low, r.high, 3, signed=False)}x ({r.n_model} vs "
                    f"{r.n_baseline} runs): {r.verdict}" if not math.isnan(r.low) else f" ({stats.ONE_SEED})")
        lines.append(f"{r.model} trains at {r.ratio:.3f}x the speed of {r.baseline} ({SPEED_NAME}){interval}; "
                     f"per FLOP it runs at {r.per_flop_ratio:.2f}x ({_gflops(r.model_gflops)} vs "
                     f"{_gflops(r.baseline_gflops)} GFLOPs/image, {r.model_tflop_per_s:.3f} vs "
                     f"{r.baseline_tflop_per_s:.3f} TFLOP/s achieved).")
    return lines


def gap_line(r: Any) -> str:
    """One accuracy gap in words, never without its verdict."""
    if math.isnan(r.low):
        return (f"At epoch {r.epoch}, {r.model} is {_signed(r.gap)} points of test accuracy against {r.baseline} "
                f"({r.model_value:.2f}% vs {r.baseline_value:.2f}%; {_seeds_text('', r.n_model, r.n_baseline)}): "
                f"{r.verdict}.")
    return (f"At epoch {r.epoch}, {r.model} is {_signed(r.gap)} points of test accuracy against {r.baseline} "
            f"({r.model_value:.2f}% vs {r.baseline_value:.2f}%), 95% interval {_interval_text(r.low, r.high)} "
            f"({_seeds_text(r.method, r.n_model, r.n_baseline)}): {r.verdict}.")


def not_compared_lines(groups: list[Group]) -> list[str]:
    """One line per pair of condition sets: who is not compared with whom, and what differs."""
    lines = []
    pairs = recipe_pairs(groups)
    for first, second in itertools.combinations(comparable_sets(groups), 2):
        what = "; ".join(differences(second[0], first[0]))
        recipes_only = any({model.label, baseline.label} <= {g.label for g in first + second}
                           for model, baseline in pairs)
        lead = "Compared only arch by arch, as recipe gaps" if recipes_only else "Not compared"
        lines.append(f"{lead}: {', '.join(g.label for g in second)} with {', '.join(g.label for g in first)} "
                     f"({what}).")
    return lines


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


def notes(groups: list[Group], models: pd.DataFrame) -> list[str]:
    """How the numbers were made: re-runs set aside, unresolved recipes, the speed definition."""
    lines = []
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
    lines.append(f"Speed ({SPEED_NAME}) is the median over epochs 2..N of each run (the first epoch holds "
                 "warm-up and compilation), then mean ± std over seeds; the per-epoch values stay in each "
                 f"{CSV_NAME}.")
    single = [m.model for m in models.itertuples() if m.speed_from_epoch_1]
    if single:
        lines.append(f"Runs with a single epoch take their speed from epoch 1, warm-up included: {', '.join(single)}.")
    recipes = {tuple((k, v) for k, v in g.conditions if k == "recipe" or k.startswith(KNOB)) for g in groups}
    if len(recipes) > 1:
        lines.append("Train loss depends on the recipe (augmentation, label smoothing): read it within one "
                     "recipe only; it is never compared across recipes here.")
    return lines


# -------------------------------------------------------------------------------------------- summary
@dataclass
class Summary:
    """Everything the summary shows; ``results`` is the CSV output (one row per group and epoch)."""

    groups: list[Group]
    results: pd.DataFrame
    models: pd.DataFrame
    gaps: pd.DataFrame
    speeds: pd.DataFrame
    recipe_gaps: pd.DataFrame
    takeaways: list[str]
    notes: list[str]

    @property
    def runs(self) -> list[Run]:
        return [r for g in self.groups for r in g.runs]


def summarize(paths: Sequence[Path], epochs: Sequence[int] | None = None) -> Summary:
    groups = group_runs(load_runs(paths))
    results = results_table(groups, epochs)
    models = models_table(groups)
    gaps = accuracy_gaps(groups, results)
    speeds = speed_ratios(groups)
    recipes = recipe_gaps(groups, results)
    return Summary(groups, results, models, gaps, speeds, recipes, takeaways(groups, models, gaps, speeds, recipes),
                   notes(groups, models))


# ------------------------------------------------------------------------------------------ rendering
@dataclass
class View:
    """One table as text cells; ``text`` columns may wrap, the others (numbers) are never split."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    text: tuple[str, ...] = ("Model",)


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _mean_std(row: pd.Series, column: str, digits: int) -> str:
    std = row.get(f"{column}_std", math.nan)
    text = _fmt(row[column], digits)
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


OPTIONAL_ACCURACY_TITLES = {"val_acc": "Val acc %", "test_acc_ema": "EMA test acc %", "test_acc_tta": "TTA test acc %"}


def result_view(results: pd.DataFrame) -> View:
    headers = ["Model", "Epoch", "Seeds", "Test acc % (mean ± std)", "± 95% CI", "Train loss", "Train time s (cumul.)"]
    rows = [[r["model"], str(r["epoch"]), str(r["runs"]), _mean_std(r, "test_acc", 2), _fmt(r["test_acc_ci95"], 2),
             _fmt(r.get("train_loss", math.nan), 4), _fmt(r.get(CUMULATIVE_TIME, math.nan), 1)]
            for _, r in results.iterrows()]
    return View("Results", headers, rows)


def other_accuracy_view(results: pd.DataFrame) -> View | None:
    """Validation, EMA and TTA accuracies, when the runs recorded any: beside test_acc, never instead."""
    present = [c for c in OPTIONAL_ACCURACY_TITLES if c in results and results[c].notna().any()]
    if not present:
        return None
    headers = ["Model", "Epoch", "Seeds"] + [f"{OPTIONAL_ACCURACY_TITLES[c]} (mean ± std)" for c in present]
    rows = [[r["model"], str(r["epoch"]), str(r["runs"])] + [_mean_std(r, c, 2) for c in present]
            for _, r in results.iterrows()]
    return View("Other accuracies", headers, rows)


def model_view(models: pd.DataFrame) -> View:
    headers = ["Model", "Params (M)", "GFLOPs / image", "Best test acc % (epoch)", "Epochs", "Seeds"]
    rows = [[m["model"], _fmt(m["params"] / 1e6, 2), _gflops(m["gflops"]),
             f"{m['best_test_acc']:.2f} ({m['best_epoch']})", str(m["epochs"]), str(m["runs"])]
            for _, m in models.iterrows()]
    return View("Models", headers, rows)


def speed_view(models: pd.DataFrame) -> View:
    headers = ["Model", f"{SPEED_NAME.capitalize()} (mean ± std)", "± 95% CI", "Median it/s", "TFLOP/s achieved",
               "Seeds"]
    rows = [[m["model"], _mean_std(m, "median_img_per_s", 1) + ("*" if m["speed_from_epoch_1"] else ""),
             _fmt(m["median_img_per_s_ci95"], 1), _fmt(m["median_it_per_s"], 2),
             _fmt(m["median_train_tflop_per_s"], 3), str(m["runs"])]
            for _, m in models.iterrows()]
    return View("Speed", headers, rows)


def gap_view(gaps: pd.DataFrame, title: str) -> View | None:
    if gaps.empty:
        return None
    headers = ["Model - baseline", "Epoch", "Gap (points)", "95% interval", "Seeds", "Verdict"]
    rows = [[f"{g['model']} - {g['baseline']}", str(g["epoch"]), _signed(g["gap"]),
             _interval_text(g["low"], g["high"]), _seeds_text(g["method"], g["n_model"], g["n_baseline"]),
             g["verdict"]] for _, g in gaps.iterrows()]
    return View(title, headers, rows, ("Model - baseline", "Seeds", "Verdict"))


def views(summary: Summary) -> list[View]:
    shown = [result_view(summary.results), other_accuracy_view(summary.results), model_view(summary.models),
             speed_view(summary.models), gap_view(summary.gaps, "Test accuracy gaps (like with like)"),
             gap_view(summary.recipe_gaps, "Recipe gaps in test accuracy (same arch and setup)")]
    return [view for view in shown if view is not None]


def _longest_word(texts: Iterable[str]) -> int:
    return max([len(word) for text in texts for word in text.split()] + [1])


def fit_columns(view: View, width: int) -> tuple[list[str], list[int]]:
    """Headers wrapped to their column, and column widths filling ``width``: number columns keep their
    widest cell, text columns share the rest (the widest gives way first) but never split a word."""
    headers, widths, flexible = [], [], []
    for index, header in enumerate(view.headers):
        cells = [row[index] for row in view.rows]
        if header in view.text:
            headers.append(header)
            widths.append(max(len(c) for c in cells + [header]))
            flexible.append(index)
        else:
            column = max([len(c) for c in cells] + [_longest_word([header]), min(6, len(header))])
            headers.append("\n".join(textwrap.wrap(header, column, break_long_words=False)))
            widths.append(column)
    spare = width - (3 * len(widths) + 1) - sum(widths)
    floors = {i: _longest_word([view.headers[i]] + [row[i] for row in view.rows]) for i in flexible}
    while spare < 0:
        shrinkable = [i for i in flexible if widths[i] > floors[i]]
        if not shrinkable:
            break  # narrower than the words: the terminal wraps the lines, nothing is cut
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        spare += 1
    return headers, widths


def _rich_table(view: View, width: int) -> Table:
    headers, widths = fit_columns(view, width)
    table = Table(title=view.title, title_justify="left")
    for header, column_width, name in zip(headers, widths, view.headers):
        table.add_column(header, justify="left" if name in view.text else "right", width=column_width,
                         overflow="fold")
    for cells in view.rows:
        table.add_row(*cells)
    return table


def render_rich(summary: Summary, console: Console) -> None:
    for view in views(summary):
        console.print(_rich_table(view, console.width), crop=False)
    for title, lines in (("Takeaways", summary.takeaways), ("Notes", summary.notes)):
        console.print(title, style="bold")
        for line in lines:
            console.print(f"- {line}", highlight=False)


def _markdown_table(view: View) -> str:
    out = ["| " + " | ".join(view.headers) + " |", "|" + "|".join("---" for _ in view.headers) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in view.rows]
    return "\n".join(out)


def render_markdown(summary: Summary) -> str:
    parts: list[str] = []
    for view in views(summary):
        parts += [f"## {view.title}", "", _markdown_table(view), ""]
    for title, lines in (("Takeaways", summary.takeaways), ("Notes", summary.notes)):
        parts += [f"## {title}", ""] + [f"- {line}" for line in lines] + [""]
    return "\n".join(parts)


def render_csv(summary: Summary) -> str:
    """One row per group and epoch; group-level columns (size, steady-state speed) repeated on each."""
    group_level = ["model", "params", "gflops"] + [c for c in summary.models.columns if c.startswith("median_")]
    merged = summary.results.merge(summary.models[group_level], on="model", how="left")
    return merged.to_csv(index=False)


# ----------------------------------------------------------------------------------------------- plot
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
              for m, s, one in zip(means, stds, models["speed_from_epoch_1"])]
    axis.bar_label(bars, labels=labels, padding=6)
    axis.set_yticks(positions, [textwrap.fill(m, 28) for m in models["model"]])
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
        label = f"{group.label} (n={len(group.runs)})"
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


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.summary", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, default=[Path("runs")],
                        help="run folders, folders holding runs, or epochs.csv files")
    parser.add_argument("--epochs", nargs="+", type=positive_int, default=None,
                        help="epochs to report (default: 1, 5 and the last of each model)")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table",
                        help="output format: table (fits the terminal), markdown, or csv (one row per model "
                             "and epoch)")
    parser.add_argument("--output", type=Path, default=None, help="write the output to this file too")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG: test accuracy by epoch and by training time, and img/s bars, per model")
    return parser


def render(summary: Summary, form: str) -> str:
    if form == "table":
        width = shutil.get_terminal_size((80, 24)).columns
        console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
        render_rich(summary, console)
        return "".join(line.rstrip() + "\n" for line in console.file.getvalue().splitlines())
    return render_markdown(summary) if form == "markdown" else render_csv(summary)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = summarize(args.runs, args.epochs)
    if summary.results.empty:
        raise CardinalError(f"none of the runs reached the epochs asked for ({' '.join(map(str, args.epochs))})")
    text = render(summary, args.format)
    print(text, end="")
    if args.output is not None:
        try:
            write_text_atomic(args.output, text)
        except OSError as error:
            raise CardinalError(f"cannot write {args.output}: {error.strerror or error}") from None
    if args.plot is not None:
        plot(summary, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    run(main)
