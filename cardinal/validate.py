"""The one check of a TrainConfig, whether it came from the command line or from a saved config.json.

Every field is checked for its type (an int is not a bool or a float; a float may be written as an int)
and for its range, so a hand-edited or damaged config.json fails with one line naming the field, exactly as
the flag would, instead of a traceback deep in training.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

from cardinal.cli import MAX_SEED, CardinalError, is_folder_name

MAX_LR = 1e3  # far above any useful SGD learning rate, far below an overflow
MAX_BATCH = 1 << 20
MAX_SYNTHETIC_IMAGES = 100_000  # twice CIFAR-10's training set; the images are held in memory
MAX_CLASSES = 1000
MAX_EPOCHS = 100_000
IMAGE_SIDE = 32  # a crop padding beyond the image is not a crop
PRECISIONS = ("no", "fp16", "bf16")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_problem(value: Any, hint: Any) -> Optional[str]:
    """What is wrong with ``value`` as a ``hint`` (the dataclass annotation), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if None in problems else " or ".join(problems)
    if origin is tuple:
        if not isinstance(value, tuple):
            return "a list"
        if len(args) == 2 and args[1] is Ellipsis:
            problems = [_type_problem(v, args[0]) for v in value]
        elif len(value) != len(args):
            return f"a list of {len(args)} values"
        else:
            problems = [_type_problem(v, a) for v, a in zip(value, args)]
        return next((f"a list of {p}s" for p in problems if p), None)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def check_types(record: Any) -> None:
    hints = typing.get_type_hints(type(record))
    for field in fields(record):
        hint = hints[field.name]
        if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
            continue  # a nested record is checked on its own
        problem = _type_problem(getattr(record, field.name), hint)
        if problem:
            raise CardinalError(f"{_flag(field.name)} must be {problem}, got {getattr(record, field.name)!r}")


def _bounds(config) -> List[Tuple[bool, str]]:
    from cardinal.config import RECIPES
    from cardinal.data import DATASET_CHOICES
    from cardinal.models import list_archs
    from cardinal.speedups import AUTO, COMPILE_MODES
    from cardinal.tracking import TRACKER_CHOICES

    recipe = config.recipe
    return [
        (config.arch in list_archs(), f"--arch must be one of {', '.join(list_archs())}, got {config.arch!r}"),
        (config.dataset in DATASET_CHOICES,
         f"--dataset must be one of {', '.join(DATASET_CHOICES)}, got {config.dataset!r}"),
        (config.recipe_name in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {config.recipe_name!r}"),
        (0 <= config.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED}, got {config.seed}"),
        *[(1 <= getattr(config, name) <= MAX_SYNTHETIC_IMAGES,
           f"{_flag(name)} must be between 1 and {MAX_SYNTHETIC_IMAGES}, got {getattr(config, name)}")
          for name in ("synthetic_train", "synthetic_test")],
        (2 <= config.synthetic_classes <= MAX_CLASSES,
         f"--synthetic-classes must be between 2 and {MAX_CLASSES}, got {config.synthetic_classes}"),
        (config.mixed_precision in (None, *PRECISIONS),
         f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {config.mixed_precision!r}"),
        (1 <= config.grad_accum <= recipe.batch_size,
         f"--grad-accum must be between 1 and --batch-size ({recipe.batch_size}), got {config.grad_accum}"),
        (1 <= config.eval_batch_size <= MAX_BATCH,
         f"--eval-batch-size must be between 1 and {MAX_BATCH}, got {config.eval_batch_size}"),
        (not isinstance(config.compile, str) or config.compile in (AUTO, *COMPILE_MODES),
         f"--compile-mode must be one of {', '.join((AUTO, *COMPILE_MODES))}, got {config.compile!r}"),
        (config.save_every >= 1, f"--save-every must be a positive integer, got {config.save_every}"),
        *[(getattr(config, name) >= 0, f"{_flag(name)} must be >= 0, got {getattr(config, name)}")
          for name in ("max_steps", "limit_batches", "limit_eval_batches")],
        (set(config.log_with) <= set(TRACKER_CHOICES),
         f"--log-with takes {', '.join(TRACKER_CHOICES)}, got {' '.join(config.log_with)}"),
        (config.run_name == "" or is_folder_name(config.run_name),
         f"--run-name must be a single folder name, got {config.run_name!r}"),
        (bool(config.output_dir), "--output-dir must not be empty"),
        (bool(config.data_dir), "--data-dir must not be empty"),
        (1 <= recipe.epochs <= MAX_EPOCHS, f"--epochs must be between 1 and {MAX_EPOCHS}, got {recipe.epochs}"),
        (1 <= recipe.batch_size <= MAX_BATCH,
         f"--batch-size must be between 1 and {MAX_BATCH}, got {recipe.batch_size}"),
        (0 <= recipe.lr_scale_batch <= MAX_BATCH,
         f"--lr-scale-batch must be between 0 and {MAX_BATCH}, got {recipe.lr_scale_batch}"),
        (0 < recipe.lr <= MAX_LR and 0 < recipe.effective_lr() <= MAX_LR,
         f"--lr must be positive and at most {MAX_LR:g} (after --lr-scale-batch scaling), got {recipe.lr}"),
        (0 <= recipe.crop_padding <= IMAGE_SIDE,
         f"--crop-padding must be between 0 and {IMAGE_SIDE} pixels, got {recipe.crop_padding}"),
    ]


def validate_config(config) -> None:
    """Raise CardinalError naming the first flag (or config.json field) that is wrong."""
    from cardinal.config import validate_recipe

    check_types(config)
    check_types(config.recipe)
    validate_recipe(config.recipe)
    for ok, message in _bounds(config):
        if not ok:
            raise CardinalError(message)


# --- resuming: the checkpoint and the records must tell one story ----------------------------------------------

IDENTITY_COLUMNS = ("arch", "dataset", "recipe", "seed", "params", "image_size", "global_batch")


def _whole(state: Dict[str, Any], key: str, low: int, high: int, path: Path) -> int:
    value = state.get(key)
    if type(value) is not int or not low <= value <= high:
        raise CardinalError(f"cannot resume: {path} is not a trainer state of this run ({key} must be a whole "
                            f"number from {low} to {high}, got {value!r}); restore it or start a new run")
    return value


def check_trainer_state(state: Dict[str, Any], path: Path, config, steps_per_epoch: int) -> None:
    """Types and ranges of trainer.json, against the run's length and its steps per epoch."""
    epoch = _whole(state, "epoch", 1, config.recipe.epochs, path)
    global_step = _whole(state, "global_step", 0, epoch * steps_per_epoch, path)
    _whole(state, "schedule_step", 0, global_step, path)
    _whole(state, "schedule_total_steps", 1, 2**62, path)
    for key in ("arch", "dataset"):
        if state.get(key) != getattr(config, key):
            raise CardinalError(f"cannot resume: {path} is for {key} {state.get(key)!r}, this run's is "
                                f"{getattr(config, key)!r}")


def checked_rows(path: Path, epoch: int, identity: Dict[str, Any]) -> pd.DataFrame:
    """The rows of epochs 1..epoch of this run (later ones were written after the checkpoint and are
    trained again); any row of another run, a repeated or fractional epoch, or a missing one is an error."""
    from cardinal.records import read_csv

    if not os.path.lexists(path):
        raise CardinalError(f"cannot resume: {path} is missing, but the checkpoint holds {epoch} epoch(s); "
                            "restore it from a copy or start a new run")
    frame = read_csv(path)
    epochs = frame["epoch"]
    if not (epochs == epochs.round()).all() or (epochs < 1).any() or epochs.duplicated().any():
        raise CardinalError(f"cannot resume: {path} has repeated or non-whole epochs; restore it from a copy")
    for column in IDENTITY_COLUMNS:
        if column not in frame.columns or (frame[column].astype(str) != str(identity[column])).any():
            raise CardinalError(f"cannot resume: {path} holds rows of another run (its {column} is not "
                                f"{identity[column]}); restore the run's own epochs.csv")
    covered = frame[epochs <= epoch]
    missing = sorted(set(range(1, epoch + 1)) - set(covered["epoch"].astype(int)))
    if missing:
        raise CardinalError(f"cannot resume: {path} lacks the rows of epoch(s) {', '.join(map(str, missing))} "
                            f"that the checkpoint covers; restore it from a copy or start a new run")
    return covered.sort_values("epoch").reset_index(drop=True)


def check_restart_loses_nothing(path: Path, first_save: int) -> None:
    """A run folder with no complete checkpoint trains again from epoch 1 and rewrites its records. A crash
    before the first checkpoint leaves rows of epochs 1..first_save at most, which the new start writes
    again; rows past it mean a checkpoint existed and was removed, and starting over would lose them."""
    from cardinal.records import read_csv

    if not os.path.lexists(path):
        return
    if (read_csv(path)["epoch"] > first_save).any():
        raise CardinalError(f"cannot resume: {path.parent} holds no checkpoint, but records epochs past "
                            f"{first_save}, after which its first was saved; restore checkpoint/ from a copy, or "
                            "train anew under another --run-name")


def check_rows_agree(state: Dict[str, Any], rows: pd.DataFrame, path: Path) -> None:
    """The checkpoint's step counts are the sums of its epochs' rows: a stale or planted one is refused."""
    steps = int(rows["steps"].sum()) if "steps" in rows else None
    applied = steps - int(rows["skipped_steps"].sum()) if steps is not None and "skipped_steps" in rows else None
    if (steps, applied) != (state["global_step"], state["schedule_step"]):
        raise CardinalError(f"cannot resume: {path} (global_step {state['global_step']}, schedule_step "
                            f"{state['schedule_step']}) does not match the {len(rows)} epochs recorded in "
                            "epochs.csv; restore the run's own files or start a new run")
