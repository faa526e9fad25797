"""Step 2: which runs are replicates (one group per arch and conditions, one run per seed) and their names.

A group is every run of one arch under identical conditions: dataset, resolved recipe (every knob, read
from the run's config.json), precision, memory format, compilation, global batch, world size, device and
data size. Runs of a group that differ only in seed are replicates; a re-run of a seed counts once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cardinal.records import CONFIG_NAME
from cardinal.summary.load import KNOB, SETUP_KNOBS, Conditions, Run

SHOWN_AS_BATCH = KNOB + "batch_size"  # the CSV's global_batch names it
LENGTH = KNOB + "epochs"  # the planned length: a column of its own in the final table, never a label part


@dataclass(eq=False)  # a group is itself: equal-looking groups are still two
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
    def resolved(self) -> bool:
        return dict(self.conditions)["recipe_resolved"]

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    @property
    def length(self) -> int:
        """The planned number of epochs (the last one reached when no config.json says)."""
        planned = dict(self.conditions).get(LENGTH)
        return planned if isinstance(planned, int) else self.last_epoch()

    def at_epoch(self, epoch: int) -> list[tuple[Any, pd.Series]]:
        """(seed, row) of every run that reached ``epoch``."""
        return [(r.seed, r.rows_by_epoch[epoch]) for r in self.runs if epoch in r.rows_by_epoch]

    def last_epoch(self) -> int:
        return max(r.last_epoch for r in self.runs)

    def finished(self) -> bool:
        """Every run reached the planned end: only then is the last epoch the end of the run."""
        return all(r.complete for r in self.runs) and self.last_epoch() >= self.length

    def medians(self, column: str) -> list[float]:
        """Each run's steady-state speed (see Run.median_speed)."""
        return [r.median_speed(column) for r in self.runs]

    @property
    def epochs_are_runs(self) -> bool:
        """Whether each epoch k of its runs is itself a k-epoch run (a constant LR, nothing sized by length)."""
        return all(r.epochs_are_runs for r in self.runs)

    def first_value(self, column: str) -> float:
        values = [r.frame[column].iloc[0] for r in self.runs if column in r.frame]
        return float(values[0]) if values else float("nan")


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


def comparable_sets(groups: list[Group]) -> list[list[Group]]:
    """Groups measured under identical conditions (they differ in arch only), in order of appearance."""
    sets: dict[Conditions, list[Group]] = {}
    for group in groups:
        sets.setdefault(group.conditions, []).append(group)
    return list(sets.values())


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in order of first appearance, comparable ones side by side, labelled by what tells them apart."""
    grouped: dict[tuple[str, Conditions], list[Run]] = {}
    for r in runs:
        grouped.setdefault((r.arch, r.conditions), []).append(r)
    groups = []
    for (arch, conditions), members in grouped.items():
        kept, dropped = keep_one_per_seed(members)
        groups.append(Group(arch, conditions, kept, dropped))
    groups = [g for members in comparable_sets(groups) for g in members]
    for group, label in zip(groups, group_labels(groups)):
        group.label = label
    return groups


# --------------------------------------------------------------------------------------------- labels
CONDITION_NAMES = {
    "dataset": "dataset", "recipe": "recipe", "precision": "precision", "channels_last": "memory format",
    "compiled": "compilation", "global_batch": "global batch", "world_size": "world size",
    "device": "device", "train_images": "training images per epoch", "test_images": "test images",
}


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


def _peers(name: str, group: Group, groups: list[Group]) -> list[Group]:
    """The groups a condition must vary among to be named in ``group``'s label."""
    same_recipe = [g for g in groups if g.recipe_name == group.recipe_name]
    if name.startswith(KNOB):
        return [g for g in same_recipe if g.resolved]  # a knob is named when it varies within one recipe
    if name == "global_batch":  # the recipe's name says it, unless one recipe ran at two batches
        return same_recipe
    return [g for g in groups if g.resolved] if name in SETUP_KNOBS else groups


def _unique(labels: list[str]) -> list[str]:
    counts, seen, unique = Counter(labels), Counter(), []
    for label in labels:  # last resort: conditions that print alike (0.1 and "0.1")
        seen[label] += 1
        unique.append(label if counts[label] == 1 else f"{label} #{seen[label]}")
    return unique


def group_labels(groups: list[Group]) -> list[str]:
    """'arch (recipe)' plus every condition that varies between the groups, so that equal labels never
    hide different conditions; a recipe knob is named when it varies within one recipe name."""
    labels = []
    for group in groups:
        parts = [group.recipe_name]
        if not group.resolved and any(g.resolved and g.recipe_name == group.recipe_name for g in groups):
            parts.append("recipe unresolved")
        for name, value in group.conditions:
            if name not in ("recipe", "recipe_resolved", SHOWN_AS_BATCH) and _varies(name, _peers(name, group, groups)):
                parts.append(label_part(name, value))
        labels.append(f"{group.arch} ({', '.join(parts)})")
    return _unique(labels)


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
        if name.startswith(KNOB) and not same_recipe and name != LENGTH:
            continue  # 'recipe fast vs seed' already says it
        values = (first.get(name), second.get(name))
        if name in ("precision", "channels_last", "compiled"):
            shown = [label_part(name, v) for v in values]
        else:
            shown = [_number(v) for v in values]
        said.append(f"{CONDITION_NAMES.get(name, name.removeprefix(KNOB))} {shown[0]} vs {shown[1]}")
    return said


# ------------------------------------------------------------------------------------- short labels
@dataclass
class Legend:
    """Names for a table of many settings: what all share (said once), what follows from the recipe's name
    (said once per recipe), and per group only what tells it apart from the others shown."""

    shared: list[str]
    by_recipe: dict[str, list[str]]
    parts: list[list[tuple[str, str]]]  # per group, (condition, words) in label order

    def label(self, index: int) -> str:
        parts = self.parts[index]
        if parts and parts[0][0] == "arch":
            rest = [text for _, text in parts[1:]]
            return parts[0][1] + (f" ({', '.join(rest)})" if rest else "")
        return ", ".join(text for _, text in parts) or "(all shared)"

    def pair(self, model: int, baseline: int) -> str:
        """'resnext50_32x4d vs resnet50 (seed)': what differs, then what the two share."""
        a, b = dict(self.parts[model]), dict(self.parts[baseline])
        names = list(dict.fromkeys([n for n, _ in self.parts[model]] + [n for n, _ in self.parts[baseline]]))
        differ = [n for n in names if a.get(n) != b.get(n)]
        if not differ:
            return f"{self.label(model)} vs {self.label(baseline)}"
        common = [a[n] for n in names if n not in differ]
        text = " vs ".join(", ".join(side[n] for n in differ if n in side) or "-" for side in (a, b))
        return text + (f" ({', '.join(common)})" if common else "")


def _said_by_recipe_name(name: str) -> bool:
    return name.startswith(KNOB) or name in SETUP_KNOBS


def legend(groups: list[Group], with_length: bool = False) -> Legend:
    """Short labels for ``groups``; the planned length only ``with_length`` (the final table shows it as a
    column; per-epoch tables must name it where it varies)."""
    shared: list[str] = []
    by_recipe: dict[str, list[str]] = {}
    parts: list[list[tuple[str, str]]] = [[] for _ in groups]
    recipes = list(dict.fromkeys(g.recipe_name for g in groups))
    for name, words in (("arch", lambda g: g.arch), ("recipe", lambda g: g.recipe_name)):
        if len({words(g) for g in groups}) > 1 or (name == "arch" and len(groups) == 1):
            for index, group in enumerate(groups):
                parts[index].append((name, words(group)))
        else:
            shared.append(("recipe " if name == "recipe" else "") + words(groups[0]))
    if all(not g.resolved for g in groups) and len(groups) > 1:
        shared.append("recipe unresolved")
    elif any(not g.resolved for g in groups):
        for index, group in enumerate(groups):
            if not group.resolved and len(groups) > 1:
                parts[index].append(("recipe_resolved", "recipe unresolved"))
    names = dict.fromkeys(n for g in groups for n, _ in g.conditions)
    for name in names:
        if name in ("recipe", "recipe_resolved", SHOWN_AS_BATCH) or (name == LENGTH and not with_length):
            continue
        peers = [g for g in groups if g.resolved] if _said_by_recipe_name(name) else groups
        if not _varies(name, peers):
            if peers and not _said_by_recipe_name(name):
                shared.append(label_part(name, dict(peers[0].conditions).get(name)))
            continue
        for recipe in recipes:
            members = [g for g in peers if g.recipe_name == recipe]
            if _varies(name, members):
                for index, group in enumerate(groups):
                    if group in members:
                        parts[index].append((name, label_part(name, dict(group.conditions).get(name))))
            elif members and not _said_by_recipe_name(name):
                by_recipe.setdefault(recipe, []).append(label_part(name, dict(members[0].conditions).get(name)))
    return Legend(shared, by_recipe, parts)
