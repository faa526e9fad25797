"""Compare runs: which runs are replicates, how far apart the settings are, and how sure that is.

    python -m cardinal.summary                         # every run under runs/
    python -m cardinal.summary runs/sweep --all        # also the per-epoch tables, takeaways and notes
    python -m cardinal.summary runs/sweep --all --every-pair  # every pair of a sweep, not each against its best
    python -m cardinal.summary runs/study --epochs 1 5 10 --format markdown --output study.md
    python -m cardinal.summary runs/study --plot study.png

The steps, one module each: load (find the epochs.csv files; skip, saying why, any whose values fall
outside their meaning) -> group (one group per arch and conditions, one run per seed) -> compare (means
over seeds, gaps and speed ratios with 95% intervals and verdicts) -> render (the answer first: final
accuracy per setting and the gaps at the end of runs of equal length) -> plot (on request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cardinal.summary.compare import (
    arch_pairs,
    final_gaps,
    final_table,
    gap_table,
    models_table,
    recipe_pairs,
    results_table,
    shown_pairs,
    speed_ratios,
)
from cardinal.summary.group import Group, group_runs
from cardinal.summary.load import Run, Skipped, load_runs
from cardinal.summary.takeaways import notes, takeaways

__all__ = ["Group", "Run", "Skipped", "Summary", "arch_pairs", "build_parser", "gap_table", "group_runs", "load_runs",
           "main",
           "recipe_pairs", "summarize"]


@dataclass
class Summary:
    """Everything the summary shows; ``results`` is the CSV output (one row per group and epoch)."""

    groups: list[Group]
    skipped: list[Skipped]
    results: pd.DataFrame
    models: pd.DataFrame
    finals: pd.DataFrame
    final_gaps: pd.DataFrame
    gaps: pd.DataFrame
    speeds: pd.DataFrame
    recipe_gaps: pd.DataFrame
    takeaways: list[str]
    notes: list[str]

    @property
    def runs(self) -> list[Run]:
        return [r for g in self.groups for r in g.runs]


def summarize(paths: Sequence[Path], epochs: Sequence[int] | None = None, every_pair: bool = False) -> Summary:
    """Load, group and compare the runs under ``paths``; ``epochs``: the per-epoch rows to report;
    ``every_pair``: per-epoch gaps and takeaways for every pair of a sweep's settings, not only as the answer
    sets them (each against the best)."""
    loaded = load_runs(paths)
    groups = group_runs(loaded.runs)
    results = results_table(groups, epochs)
    models = models_table(groups)
    pairs = {"arch": arch_pairs(groups), "recipe": recipe_pairs(groups)}
    shown = pairs if every_pair else {kind: shown_pairs(found, kind) for kind, found in pairs.items()}
    gaps, recipes = gap_table(shown["arch"], results), gap_table(shown["recipe"], results)
    speeds = speed_ratios(shown["arch"])
    left_out = sum(len(pairs[kind]) - len(shown[kind]) for kind in pairs)
    return Summary(groups, loaded.skipped, results, models, final_table(groups), final_gaps(groups), gaps,
                   speeds, recipes, takeaways(groups, models, gaps, speeds, recipes),
                   notes(groups, models, left_out))


def build_parser():
    """The command line's parser (in cli.py, which imports this package: imported when asked for)."""
    from cardinal.summary.cli import build_parser as cli_parser

    return cli_parser()


def main(argv: Sequence[str] | None = None) -> int:
    from cardinal.summary.cli import main as cli_main

    return cli_main(argv)
