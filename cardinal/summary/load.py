"""Step 1: find the runs and let in only what means something.

Every check on what a run folder holds lives here, so the later steps can trust each value they see: a
file that is not a regular file is never opened, a CSV over MAX_CSV_BYTES is not read, and a CSV whose
values fall outside their meaning (an accuracy of 250 %, epoch 1.7, a NaN seed, 0 img/s, two archs in one
run) is skipped with one line saying which file and why. Nothing usable left is a CardinalError.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cardinal.cli import MAX_SEED, CardinalError
from cardinal.config import PROVENANCE_FIELDS, saved_recipe
from cardinal.records import CONFIG_NAME, CSV_NAME, RUN_COLUMNS, speed_includes_warm_up, steady_state

REQUIRED = ("epoch", "test_acc", "img_per_s", "arch", "seed")
ACCURACIES = ("test_acc", "val_acc", "test_acc_ema", "test_acc_tta")  # every one optional but test_acc
PERCENTS = ACCURACIES + ("train_acc", "val_acc_ema", "val_acc_tta")  # each within 0..100 where present
LOSSES = ("train_loss", "train_objective", "test_loss", "val_loss")
SPEEDS = ("img_per_s", "it_per_s", "train_tflop_per_s")
TIMES = ("epoch_time_s", "train_time_s")
SIZES = ("params", "gflops", "train_images", "test_images")
NUMERIC = ACCURACIES + LOSSES + SPEEDS + TIMES + SIZES
CUMULATIVE_TIME = "train_time_cum_s"  # sum of train_time_s up to the epoch: the honest x-axis for speed
# A resume runs a new command line and may run newer versions; everything else says what the run is.
MAY_CHANGE_ON_RESUME = ("command", "torch_version", "accelerate_version", "cardinal_version")
IDENTITY = tuple(c for c in RUN_COLUMNS if c not in MAY_CHANGE_ON_RESUME)
MAX_EPOCH = 100_000
MAX_CSV_BYTES = 64 * 2**20  # a run of MAX_EPOCH epochs writes ~50 MB
MAX_CONFIG_BYTES = 2**20
# Conditions read from the CSV (what ran), then from config.json (what was asked), in label order.
CSV_CONDITIONS = ("precision", "channels_last", "compiled", "global_batch", "world_size", "device",
                  "train_images", "test_images")
SETUP_KNOBS = ("grad_accum", "sync_bn", "init_weights", "limit_batches")  # change what an epoch computes
KNOB = "recipe."  # prefix of resolved recipe knobs among the conditions

Conditions = tuple[tuple[str, Any], ...]


class Unusable(ValueError):
    """Why one file cannot be part of the summary (it is skipped, the others go on)."""


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.path}: {self.reason}"


@dataclass(frozen=True)
class Run:
    """One run folder: its epochs and everything that decides what it can be compared with."""

    csv: Path
    frame: pd.DataFrame
    arch: str
    seed: int
    conditions: Conditions
    planned_epochs: int | None
    mtime: float
    epochs_are_runs: bool = False  # each epoch k is itself a k-epoch run (Recipe.epochs_are_runs)

    @property
    def folder(self) -> Path:
        return self.csv.parent

    @property
    def recipe_resolved(self) -> bool:
        return dict(self.conditions)["recipe_resolved"]

    @cached_property
    def last_epoch(self) -> int:
        return int(self.frame["epoch"].max())  # asked for by every pair and rule that reads where a run ended

    @cached_property
    def rows_by_epoch(self) -> dict[int, pd.Series]:
        """Each epoch's row (the first, should one repeat), looked up once: a sweep's gaps read thousands."""
        first = self.frame.drop_duplicates("epoch")
        return {int(epoch): row for epoch, (_, row) in zip(first["epoch"], first.iterrows())}

    @property
    def complete(self) -> bool:
        """Reached its planned epochs (a run without config.json cannot tell, and counts as complete)."""
        return self.planned_epochs is None or self.last_epoch >= self.planned_epochs

    def median_speed(self, column: str) -> float:
        """Steady-state speed: the median over the epochs after warm-up (records.steady_state decides the rule)."""
        if column not in self._median_speeds:
            self._median_speeds[column] = steady_state(self.frame, column) if column in self.frame else math.nan
        return self._median_speeds[column]

    @cached_property
    def _median_speeds(self) -> dict[str, float]:
        return {}  # every pair a setting is part of asks again

    @property
    def speed_includes_warm_up(self) -> bool:
        """Whether its speed had to come from warm-up epochs (a one-epoch run)."""
        return speed_includes_warm_up(self.frame)


@dataclass(frozen=True)
class Loaded:
    runs: list[Run]
    skipped: list[Skipped]


# ------------------------------------------------------------------------------------------ files
def find_csvs(paths: Sequence[Path]) -> list[Path]:
    """Every epochs.csv under ``paths`` (a file named directly counts whatever its name), each once."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(path.rglob(CSV_NAME)))
        elif path.exists() or path.is_symlink():
            found.append(path)  # read_bytes decides whether it is a file that may be read
        else:
            raise CardinalError(f"{path} does not exist")
    unique = {csv.resolve(): csv for csv in found}  # a run named twice (runs runs/x) counts once
    return list(unique.values())


def read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. FIFOs, devices and sockets (or links to
    them) are never opened: opening a FIFO blocks, reading /dev/zero never ends."""
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise Unusable("not a regular file (a FIFO, device or socket is never opened)")
        if before.st_size > limit:
            raise Unusable(f"{before.st_size:,} bytes, more than the {limit:,} read at most")
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # swapped after the check
                raise Unusable("not a regular file")
            data = handle.read(limit + 1)
    except OSError as error:
        raise Unusable(f"cannot read it: {error.strerror or error}") from None
    if len(data) > limit:
        raise Unusable(f"more than the {limit:,} bytes read at most")
    return data


def read_config(csv: Path) -> dict[str, Any] | None:
    """config.json beside the CSV, or None when it is absent or not a cardinal config."""
    path = csv.parent / CONFIG_NAME
    if not path.exists():
        return None
    try:
        config = json.loads(read_bytes(path, MAX_CONFIG_BYTES))
    except (Unusable, ValueError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("recipe"), dict) else None


def read_frame(csv: Path) -> pd.DataFrame:
    data = read_bytes(csv, MAX_CSV_BYTES)
    try:
        return pd.read_csv(io.BytesIO(data))
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "empty"
        raise Unusable(f"cannot read it: {first}") from None


# ------------------------------------------------------------------------------------- validation
def _plain(value: Any) -> Any:
    """A hashable Python value from a CSV cell or JSON field (numpy scalars, lists, 'True', 256.0; a mapping,
    which no cardinal config holds as a knob, as its JSON text)."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
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


def _check_columns(frame: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise Unusable(f"not a cardinal epochs CSV (missing columns: {', '.join(missing)})")
    if frame.empty:
        raise Unusable("holds no epochs yet")


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in NUMERIC + PERCENTS + ("epoch",) if c in frame.columns]
    try:
        return frame.astype(dict.fromkeys(columns, float))
    except (ValueError, TypeError):
        raise Unusable("non-numeric values in its metric columns") from None


def _check_epochs(epochs: pd.Series) -> None:
    if epochs.isna().any():
        raise Unusable("an epoch number is missing")
    bad = epochs[(epochs < 1) | (epochs > MAX_EPOCH) | (epochs != epochs.round())]
    if not bad.empty:
        raise Unusable(f"epoch {bad.iloc[0]:g} is not a whole number from 1 to {MAX_EPOCH:,}")
    repeated = epochs[epochs.duplicated()]
    if not repeated.empty:
        raise Unusable(f"epoch {int(repeated.iloc[0])} appears more than once")


def _check_range(frame: pd.DataFrame, columns: Sequence[str], low: float, high: float, what: str,
                 required: Sequence[str] = (), low_open: bool = False, finite: bool = True) -> None:
    """Each value of ``columns`` within [low, high] ((low, high] when ``low_open``) and finite unless told
    otherwise; NaN only in columns not ``required``."""
    for column in (c for c in columns if c in frame.columns):
        values = frame[column]
        if column in required and values.isna().any():
            raise Unusable(f"{column} is missing at epoch {frame.loc[values.isna(), 'epoch'].iloc[0]:g}")
        present = values.dropna()
        outside = (present <= low if low_open else present < low) | (present > high)
        if finite:
            outside |= ~np.isfinite(present)
        if outside.any():
            value, epoch = present[outside].iloc[0], frame.loc[present[outside].index[0], "epoch"]
            raise Unusable(f"{column} {value:g} at epoch {epoch:g} is not {what}")


def _check_identity(frame: pd.DataFrame) -> None:
    """A run is one arch, dataset, recipe, seed, ...: a column that changes within the file mixes runs."""
    for column in (c for c in IDENTITY if c in frame.columns):
        values = list(dict.fromkeys(_plain(v) for v in frame[column]))
        if len(values) > 1:
            shown = ", ".join(repr(v) for v in values[:3])
            raise Unusable(f"{column} changes within the run ({shown}): one CSV must hold one run")


def _seed(frame: pd.DataFrame) -> int:
    seed = _plain(frame["seed"].iloc[0])
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise Unusable(f"seed {seed!r} is not a whole number from 0 to {MAX_SEED}")
    return seed


def validate(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with numbers as floats and epochs sorted, or Unusable naming the first value out of place."""
    _check_columns(frame)
    frame = _numeric(frame)
    _check_epochs(frame["epoch"])
    _check_range(frame, PERCENTS, 0.0, 100.0, "a percentage from 0 to 100", required=("test_acc",))
    _check_range(frame, SPEEDS, 0.0, math.inf, "a positive finite speed", required=("img_per_s",),
                 low_open=True)
    _check_range(frame, TIMES + SIZES, 0.0, math.inf, "a finite number >= 0")
    _check_range(frame, LOSSES, 0.0, math.inf, "a loss >= 0", finite=False)  # a diverged run: inf
    _check_identity(frame)
    if not str(_plain(frame["arch"].iloc[0]) or "").strip():
        raise Unusable("its arch is empty")
    frame["epoch"] = frame["epoch"].astype(int)
    return frame.sort_values("epoch").reset_index(drop=True)


# ------------------------------------------------------------------------------------------- runs
def _column_value(frame: pd.DataFrame, column: str) -> Any:
    """The run's value of a per-run column (constant within a valid run, except train_images)."""
    if column not in frame:
        return None
    return _plain(frame[column].iloc[0])  # train_images: the last epoch of a run stopped mid-epoch is short


def run_conditions(frame: pd.DataFrame, config: dict[str, Any] | None) -> Conditions:
    """Everything but arch and seed that must match for two runs to be compared."""
    recipe_name = _column_value(frame, "recipe")
    conditions: list[tuple[str, Any]] = [("dataset", _column_value(frame, "dataset"))]
    if config is not None:
        conditions.append(("recipe", _plain(config.get("recipe_name", recipe_name))))
        conditions.append(("recipe_resolved", True))
        conditions += [(KNOB + str(k), _plain(v)) for k, v in sorted(config["recipe"].items())
                       if k not in PROVENANCE_FIELDS]
    else:
        conditions += [("recipe", recipe_name), ("recipe_resolved", False)]
    conditions += [(c, _column_value(frame, c)) for c in CSV_CONDITIONS]
    if config is not None:
        conditions += [(k, _plain(config.get(k))) for k in SETUP_KNOBS]
    return tuple(conditions)


def _planned_epochs(config: dict[str, Any] | None) -> int | None:
    planned = _plain((config or {}).get("recipe", {}).get("epochs"))
    return planned if isinstance(planned, int) and 1 <= planned <= MAX_EPOCH else None


def _epochs_are_runs(config: dict[str, Any] | None) -> bool:
    """Recipe.epochs_are_runs of the saved recipe; False when there is none or it cannot be rebuilt."""
    if config is None:
        return False
    try:
        return saved_recipe(config["recipe"]).epochs_are_runs
    except (TypeError, ValueError):
        return False


def _with_cumulative_time(frame: pd.DataFrame) -> pd.DataFrame:
    complete = "train_time_s" in frame and frame["train_time_s"].notna().all()
    column = "train_time_s" if complete else "epoch_time_s"
    frame[CUMULATIVE_TIME] = frame[column].cumsum() if column in frame else math.nan
    return frame


def read_run(csv: Path) -> Run:
    """One validated run; Unusable says why the file cannot be one."""
    frame = _with_cumulative_time(validate(read_frame(csv)))
    config = read_config(csv)
    return Run(csv=csv, frame=frame, arch=str(_column_value(frame, "arch")), seed=_seed(frame),
               conditions=run_conditions(frame, config), planned_epochs=_planned_epochs(config),
               mtime=os.stat(csv).st_mtime, epochs_are_runs=_epochs_are_runs(config))


def load_runs(paths: Sequence[Path]) -> Loaded:
    """Every usable run under ``paths`` and every file skipped, with why; CardinalError when none is usable."""
    csvs = find_csvs(paths)
    if not csvs:
        raise CardinalError(f"no {CSV_NAME} found under {', '.join(str(p) for p in paths)}")
    runs, skipped = [], []
    for csv in csvs:
        try:
            runs.append(read_run(csv))
        except Unusable as why:
            skipped.append(Skipped(csv, str(why)))
    if not runs:
        raise CardinalError(nothing_usable(skipped))
    return Loaded(runs, skipped)


def nothing_usable(skipped: list[Skipped]) -> str:
    if len(skipped) == 1:
        return f"cannot use {skipped[0].path}: {skipped[0].reason}"
    shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"none of the {len(skipped)} {CSV_NAME} files can be used ({shown}{more})"
