"""Checkpoint writes that do not stall training: the state is copied to host memory at the epoch boundary
and written to disk by a background thread while the next epoch trains.

A resnet50 checkpoint (weights, momentum, maybe an EMA) is a few hundred MB; written in the loop it costs
about a second an epoch, which on a GPU that trains an epoch in a few seconds is most of the time outside
training. Here the loop waits only for a copy into host buffers reused from save to save (page-locked on
CUDA, with one device sync).

The save sequence and its crash safety are those of :mod:`cardinal.checkpoint`: files go into the staging
folder, ``trainer.json`` is written last, then the folder is swapped in. At most one write is in flight.
Before the next epoch's row is written the previous write is waited for, so the CSV never runs more than
one epoch ahead of the newest checkpoint, exactly as with a write in the loop. A write that fails (a full
disk) raises its one-line error at that wait, keeping the previous checkpoint. Only the main process writes
in the background; the thread never talks to other processes, so it cannot deadlock a collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from cardinal.checkpoint import (
    AVERAGE_FILE,
    CHECKPOINT_DIR,
    FORMAT,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCALER_FILE,
    TRAINER_STATE,
    checkpoint_dir,
    recover,
    rng_file,
    rng_state,
    saved_epoch,
    staging_dir,
)
from cardinal.cli import CardinalError
from cardinal.crash import crash_point
from cardinal.fileio import resume_after_mending, write_text_atomic


class HostCopier:
    """Copies nested state (dicts, lists, tensors, numbers) off the training tensors, which training goes on
    to change in place. Tensors land in host buffers kept from one save to the next (allocating and first
    touching them is the slow part); for CUDA tensors they are page-locked, with one device sync for all.
    A copy stays valid until the next one, so a write must finish before the next copy is taken."""

    def __init__(self) -> None:
        self._buffers: List[torch.Tensor] = []
        self._used = 0
        self._from_device = False

    def copy(self, state: Any) -> Any:
        self._used, self._from_device = 0, False
        copied = self._walk(state)
        if self._from_device:
            torch.cuda.synchronize()
        return copied

    def _walk(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value.detach())
        if isinstance(value, dict):
            return type(value)((key, self._walk(item)) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self._walk(item) for item in value)
        return value

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        on_device = tensor.device.type == "cuda"
        self._from_device |= on_device
        index, self._used = self._used, self._used + 1
        if index == len(self._buffers):
            self._buffers.append(torch.empty(0))
        buffer = self._buffers[index]
        if (buffer.shape, buffer.dtype, buffer.stride(), buffer.is_pinned()) != (
                tensor.shape, tensor.dtype, tensor.stride(), on_device):
            buffer = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=on_device)
            self._buffers[index] = buffer
        return buffer.copy_(tensor, non_blocking=on_device)


class CheckpointWriter:
    """Saves a run's checkpoints, in the background (``background=True``) or in the caller's thread.

    Every process calls :meth:`save` (each writes its RNG state); :meth:`wait` returns once the last save is
    on disk and raises its error if it failed.
    """

    def __init__(self, accelerator, run_dir: Path, background: bool = True) -> None:
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.background = background
        self._copier = HostCopier()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[CardinalError] = None

    def save(self, model, optimizer, trainer_state: Dict[str, Any], average=None) -> None:
        """Start saving the current state; ``average``, the EMA of the weights, is saved when the run keeps one."""
        self.wait()
        accelerator, staging = self.accelerator, staging_dir(self.run_dir)
        main = accelerator.is_main_process
        if main:
            recover(self.run_dir)
        accelerator.wait_for_everyone()
        try:
            if main:
                staging.mkdir(parents=True)
            accelerator.wait_for_everyone()
            save_file(rng_state(accelerator.device), staging / rng_file(accelerator.process_index))
        except (OSError, RuntimeError) as error:
            raise self._failed(error) from None
        accelerator.wait_for_everyone()
        if not main:
            return
        files = self._copier.copy(self._files(model, optimizer, average))
        state = {**trainer_state, "format": FORMAT, "world_size": accelerator.num_processes}
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(files, state), name="cardinal-checkpoint")
            self._thread.start()
        else:
            self._write(files, state)
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight is done; raise its error (once) if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Let a write in flight finish, as on the way out after another error; its own error is dropped, the
        previous checkpoint being kept either way."""
        with contextlib.suppress(CardinalError):
            self.wait()

    def _files(self, model, optimizer, average) -> Dict[str, Any]:
        files = {MODEL_FILE: self.accelerator.unwrap_model(model).state_dict(),
                 OPTIMIZER_FILE: optimizer.state_dict()}
        if self.accelerator.scaler is not None:
            files[SCALER_FILE] = self.accelerator.scaler.state_dict()
        if average is not None:
            files[AVERAGE_FILE] = average.state_dict()
        return files

    def _write(self, files: Dict[str, Any], trainer_state: Dict[str, Any]) -> None:
        """The main process's part: the big files, trainer.json last, then the swap."""
        staging = staging_dir(self.run_dir)
        try:
            for name, state in files.items():
                save_file(state, staging / name)
            crash_point("checkpoint-files-written")
            write_text_atomic(staging / TRAINER_STATE, json.dumps(trainer_state, indent=2))
            recover(self.run_dir)
        except (OSError, RuntimeError) as error:
            self._error = self._failed(error)

    def _failed(self, error: Exception) -> CardinalError:
        """Drop the partial staging folder and say which checkpoint is kept."""
        if self.accelerator.is_main_process:
            shutil.rmtree(staging_dir(self.run_dir), ignore_errors=True)
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        kept = checkpoint_dir(self.run_dir)
        return CardinalError(f"cannot save a checkpoint in {self.run_dir}: {reason}; "
                             + (f"the checkpoint of epoch {saved_epoch(kept)} is kept" if kept
                                else "no earlier checkpoint exists")
                             + f"; {resume_after_mending(self.run_dir)}")


class _WholeWrites:
    """A file torch.save writes into that writes every byte it is given (a short write is continued, as a
    full disk makes the first one short) and keeps the OSError that stops it: torch reports that only as a
    RuntimeError about stream positions."""

    os_write = staticmethod(os.write)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += self.os_write(self.fd, view[done:])
        except OSError as error:
            self.error = error
            raise
        return done

    def flush(self) -> None:
        pass


def save_file(state: Any, path: Path) -> None:
    """torch.save, then flushed to disk; a full disk is the OSError that says so."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        target = _WholeWrites(fd)
        try:
            torch.save(state, target)
        except RuntimeError:
            if target.error is not None:
                raise target.error from None
            raise
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, model, optimizer, run_dir: Path, trainer_state: Dict[str, Any],
                    average=None) -> Path:
    """Save now, in this thread (every process calls it). A failure (full disk, unwritable folder) raises
    CardinalError and leaves the previous checkpoint."""
    CheckpointWriter(accelerator, run_dir, background=False).save(model, optimizer, trainer_state, average)
    accelerator.wait_for_everyone()
    return Path(run_dir) / CHECKPOINT_DIR
