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


def _folders(run_dir: Path) -> Dict[str, Path]:
    return {"final": run_dir / CHECKPOINT_DIR, "staging": run_dir / f".{CHECKPOINT_DIR}.new",
            "previous": run_dir / f".{CHECKPOINT_DIR}.old"}


def save_checkpoint(accelerator, run_dir: Path, trainer_state: Dict[str, Any]) -> Path:
    """Every process calls this (each saves its own RNG state); the main process swaps the folder in.

    ``trainer.json`` is written last, so a folder holding it is complete. A crash at any point leaves a
    complete checkpoint in one of the three folders, and :func:`checkpoint_dir` finds it.
    """
    folders = _folders(run_dir)
    if accelerator.is_main_process and folders["staging"].exists():
        shutil.rmtree(folders["staging"])
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folders["staging"]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(folders["staging"] / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        shutil.rmtree(folders["previous"], ignore_errors=True)
        if folders["final"].exists():
            folders["final"].rename(folders["previous"])
        folders["staging"].rename(folders["final"])
        shutil.rmtree(folders["previous"], ignore_errors=True)
    accelerator.wait_for_everyone()
    return folders["final"]


def checkpoint_dir(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, even if a save was interrupted mid-swap."""
    folders = _folders(run_dir)
    for name in ("final", "staging", "previous"):
        if (folders[name] / TRAINER_STATE).is_file():
            return folders[name]
    return None


def read_trainer_state(run_dir: Path) -> Optional[Dict[str, Any]]:
    folder = checkpoint_dir(run_dir)
    if folder is None:
        return None
    path = folder / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CardinalError(f"cannot read {path}: {error}") from None


def load_checkpoint(accelerator, run_dir: Path) -> Dict[str, Any]:
    state = read_trainer_state(run_dir)
    folder = checkpoint_dir(run_dir)
    if state is None or folder is None:
        raise CardinalError(f"no checkpoint in {run_dir} to resume from (nothing was saved yet)")
    try:
        accelerator.load_state(str(folder))
    except Exception as error:
        raise CardinalError(f"cannot load checkpoint {folder}: {str(error).strip().splitlines()[0]}") from None
    return state
