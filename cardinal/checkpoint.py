"""Epoch-boundary checkpoints of a run: model, optimizer, scaler, weight average, RNG and the trainer's
progress.

Every file is a plain tensor/number container written with ``torch.save`` and read back with
``weights_only=True``, so loading a checkpoint can never run code; ``trainer.json`` holds the rest
(epoch, steps, the schedule's length). A file that cannot be read stops the resume with one line.

Crash safety: a checkpoint is written into a staging folder, completed by ``trainer.json`` (written
last), and only then swapped in. At every moment at least one complete checkpoint exists among the
three folders, and :func:`recover` (run before every save and load) promotes the newest complete one
to ``checkpoint/`` before anything older is deleted. Saving lives in :mod:`cardinal.checkpoint_writer`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from cardinal.cli import CardinalError
from cardinal.crash import crash_point
from cardinal.safeload import UnreadableTensors, load_tensors

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer.json"
MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE, AVERAGE_FILE = "model.pt", "optimizer.pt", "scaler.pt", "ema.pt"
FORMAT = 2


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def staging_dir(run_dir: Path) -> Path:
    """Where a checkpoint is written before it is swapped in."""
    return _folders(run_dir)["staging"]


def _folders(run_dir: Path) -> Dict[str, Path]:
    return {"final": run_dir / CHECKPOINT_DIR, "staging": run_dir / f".{CHECKPOINT_DIR}.new",
            "previous": run_dir / f".{CHECKPOINT_DIR}.old"}


def saved_epoch(folder: Path) -> Optional[int]:
    """The epoch a complete checkpoint folder holds; None if incomplete (no trainer.json yet).

    trainer.json is written atomically, so one that exists but cannot be read was damaged: an error,
    never a reason to silently fall back to an older state.
    """
    path = folder / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        epoch = json.loads(path.read_text())["epoch"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise CardinalError(f"cannot read {path}: not a trainer state written by cardinal") from None
    if type(epoch) is not int or epoch < 1:
        raise CardinalError(f"cannot read {path}: its epoch must be a whole number >= 1, got {epoch!r}")
    return epoch


def _complete(run_dir: Path) -> List[tuple]:
    """(epoch, preference, name) of each complete folder, newest first; ``final`` wins a tie."""
    found = []
    for preference, (name, folder) in enumerate(_folders(run_dir).items()):
        epoch = saved_epoch(folder)
        if epoch is not None:
            found.append((epoch, -preference, name))
    return sorted(found, reverse=True)


def checkpoint_dir(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, wherever an interrupted save left it."""
    complete = _complete(run_dir)
    return _folders(run_dir)[complete[0][2]] if complete else None


def recover(run_dir: Path) -> None:
    """Make ``checkpoint/`` the newest complete checkpoint and drop the rest (main process only).

    Each step is a rename or the removal of a folder that is not the newest complete one, so a crash
    here leaves a state this function recovers from again.
    """
    folders = _folders(run_dir)
    complete = _complete(run_dir)
    if complete and complete[0][2] != "final":
        newest = folders[complete[0][2]]
        parking = folders["previous"] if newest != folders["previous"] else folders["staging"]
        shutil.rmtree(parking, ignore_errors=True)
        if folders["final"].exists():
            folders["final"].rename(parking)
            crash_point("checkpoint-parked")
        newest.rename(folders["final"])
        crash_point("checkpoint-promoted")
    for name in ("staging", "previous"):
        if folders[name].exists():
            shutil.rmtree(folders[name], ignore_errors=True)
            crash_point(f"{name}-removed")


def trainer_state_path(run_dir: Path) -> Optional[Path]:
    """The trainer.json a resume would use (before any folder is moved), or None."""
    folder = checkpoint_dir(run_dir)
    return None if folder is None else folder / TRAINER_STATE


def read_trainer_state(run_dir: Path) -> Optional[Dict[str, Any]]:
    folder = checkpoint_dir(run_dir)
    if folder is None:
        return None
    path = folder / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CardinalError(f"cannot read {path}: {error}") from None
    if not isinstance(state, dict):
        raise CardinalError(f"cannot read {path}: expected a JSON object")
    return state


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's random generators, saved beside the checkpoint so a resume draws the same numbers: the
    CPU's and its own GPU's only, so a resume that sees fewer or other GPUs still fits."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def own_cuda_rng(saved: Any, index: int) -> Optional[torch.Tensor]:
    """This process's GPU generator state from a checkpoint's ``cuda`` entry: one state, or, in checkpoints of
    earlier versions, one per visible GPU (None when this GPU's index lies beyond them)."""
    if isinstance(saved, (list, tuple)):
        return saved[index] if index < len(saved) else None
    return saved


def restore_rng(saved: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(saved["cpu"])
    if "cuda" not in saved or device.type != "cuda":
        return
    index = torch.cuda.current_device() if device.index is None else device.index  # as get_rng_state reads it
    cuda = own_cuda_rng(saved["cuda"], index)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _load(path: Path, device) -> Any:
    if not path.is_file():
        raise CardinalError(f"cannot resume: {path} is missing (incomplete checkpoint)")
    try:
        return load_tensors(path, device)
    except UnreadableTensors as error:  # a damaged or booby-trapped file: refused, never half-used
        raise CardinalError(f"cannot resume: {path} cannot be read safely: {error}") from None


def load_checkpoint(accelerator, model, optimizer, run_dir: Path, average=None) -> Dict[str, Any]:
    """Restore every saved state into the prepared objects; any unreadable file is an error."""
    if accelerator.is_main_process:
        recover(run_dir)
    accelerator.wait_for_everyone()
    state = read_trainer_state(run_dir)
    if state is None:
        raise CardinalError(f"no checkpoint in {run_dir} to resume from (nothing was saved yet)")
    folder = _folders(run_dir)["final"]
    model_state = _load(folder / MODEL_FILE, "cpu")
    optimizer_state = _load(folder / OPTIMIZER_FILE, "cpu")
    scaler_state = _load(folder / SCALER_FILE, "cpu") if accelerator.scaler is not None else None
    average_state = _load(folder / AVERAGE_FILE, "cpu") if average is not None else None
    rng_path = folder / rng_file(accelerator.process_index)
    saved_rng = _load(rng_path, "cpu") if rng_path.exists() else None  # absent when the world grew
    try:
        accelerator.unwrap_model(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        if scaler_state is not None:
            accelerator.scaler.load_state_dict(scaler_state)
        if average_state is not None:
            average.load_state_dict(average_state)
        if saved_rng is not None:
            restore_rng(saved_rng, accelerator.device)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CardinalError(f"cannot resume from {folder}: its state does not fit this run ({reason})") from None
    return state
