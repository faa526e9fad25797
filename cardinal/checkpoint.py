"""Epoch-boundary checkpoints: accelerate's ``save_state`` plus the trainer's own progress.

A checkpoint is written to a temporary folder and swapped in only when complete, so an interrupted save
never destroys the previous good one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from cardinal.cli import CardinalError
from cardinal.fileio import write_text_atomic

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer.json"


def save_checkpoint(accelerator, run_dir: Path, trainer_state: Dict[str, Any]) -> Path:
    """Every process calls this (each saves its own RNG state); the main process swaps the folder in."""
    final = run_dir / CHECKPOINT_DIR
    staging = run_dir / f".{CHECKPOINT_DIR}.new"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(staging / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        previous = run_dir / f".{CHECKPOINT_DIR}.old"
        if final.exists():
            final.rename(previous)
        staging.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / CHECKPOINT_DIR / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CardinalError(f"cannot read {path}: {error}") from None


def load_checkpoint(accelerator, run_dir: Path) -> Dict[str, Any]:
    state = read_trainer_state(run_dir)
    if state is None:
        raise CardinalError(f"no checkpoint in {run_dir} to resume from (nothing was saved yet)")
    try:
        accelerator.load_state(str(run_dir / CHECKPOINT_DIR))
    except Exception as error:
        raise CardinalError(f"cannot load checkpoint {run_dir / CHECKPOINT_DIR}: {error}") from None
    return state
