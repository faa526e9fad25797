"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, Aim) through Accelerate's own tracking.

Only the main process logs. Every epochs.csv metric is logged per epoch with the epoch as the step, and the
resolved configuration goes in as hyperparameters. A resumed run writes into the same TensorBoard folder
and continues the same W&B run (its id is kept in the run folder); MLflow and Aim start a new run.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
from pathlib import Path
from typing import Any, Dict, List, Sequence

from cardinal.cli import CardinalError
from cardinal.fileio import resume_after_mending

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
TRACKER_CHOICES = (*TRACKERS, "all")
TRACKING_DIR = "trackers"
WANDB_ID_FILE = "wandb_id.txt"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}


def resolve_trackers(names: Sequence[str]) -> List[str]:
    """The tracker list for Accelerator(log_with=...); each must be installed."""
    import importlib.util

    chosen = list(TRACKERS) if "all" in names else list(dict.fromkeys(names))
    missing = [n for n in chosen if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        packages = " ".join(PACKAGES[n] for n in missing)
        raise CardinalError(f"--log-with {' '.join(missing)} needs: pip install {packages}")
    return chosen


def flat_hyperparameters(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested config -> flat {name: bool|int|float|str}, the only values every tracker accepts."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def metrics_of(row: Dict[str, Any]) -> Dict[str, float]:
    """The numeric, finite values of an epochs.csv row (NaN/inf would break some trackers)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def init_kwargs(trackers: Sequence[str], run_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Per-tracker start arguments: W&B resumes the run whose id this folder keeps."""
    kwargs: Dict[str, Dict[str, Any]] = {}
    if "wandb" in trackers:
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
        id_file.write_text(run_id)
        kwargs["wandb"] = {"id": run_id, "resume": "allow", "name": run_dir.name}
    return kwargs


def start_tracking(accelerator, trackers: Sequence[str], run_dir: Path, config: Dict[str, Any]) -> None:
    if not trackers:
        return
    _quiet_writer_threads()
    try:
        extra = init_kwargs(trackers, run_dir) if accelerator.is_main_process else {}
        accelerator.init_trackers(run_dir.name, config=flat_hyperparameters(config), init_kwargs=extra)
    except Exception as error:  # a tracker's own setup (login, server, a full disk) failed
        accelerator.trackers = []  # half-started ones would fail again when the run ends them
        reason = (getattr(error, "strerror", None) or str(error).strip().split("\n")[0] or type(error).__name__)
        raise CardinalError(f"cannot start tracking with {', '.join(trackers)}: {reason}; mend that, then "
                            f"--resume {run_dir}") from None


def log_epoch(accelerator, trackers: Sequence[str], row: Dict[str, Any], epoch: int, run_dir: Path) -> None:
    """The epoch's metrics to every tracker; a write that fails (a full disk) is one error that says what
    is kept."""
    try:
        accelerator.log(metrics_of(row), step=epoch)
    except OSError as error:
        raise CardinalError(f"tracking with {', '.join(trackers)} failed: {error.strerror or error}; the records "
                            f"of epoch {epoch} are kept; {resume_after_mending(run_dir)}") from None


def _quiet_writer_threads() -> None:
    """TensorBoard writes its events in a thread of its own. When a write fails (a full disk) that thread's
    traceback would be printed, though the writer raises the same error again at its next call, where it
    becomes one line; so that thread's OSError is not printed."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread as writer_thread
    except ImportError:
        return  # no TensorBoard, no such thread
    previous = threading.excepthook
    if getattr(previous, "quiets_writer_threads", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and isinstance(args.thread, writer_thread)):
            previous(args)

    hook.quiets_writer_threads = True  # type: ignore[attr-defined]
    threading.excepthook = hook
