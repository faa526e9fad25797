"""One process at a time per run folder, and no run started over another.

The main process holds an exclusive ``flock`` on ``<run_dir>/.lock`` for the run's whole life; the
operating system drops it when the process ends, however it ends (even ``kill -9``), so a lock never stays
stuck and no stale-lock cleanup is needed. Other ranks of a launch work under their main process's lock.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from cardinal.cli import CardinalError, is_main_rank
from cardinal.fileio import cannot_write_folder

LOCK_NAME = ".lock"
# What makes a folder hold a run: a fresh start there would overwrite it.
RUN_FILES = ("config.json", "epochs.csv", "checkpoint", ".checkpoint.new", ".checkpoint.old")


def check_not_symlink(run_dir: Path) -> None:
    """A run folder that is a link would write wherever the link points, outside --output-dir."""
    if run_dir.is_symlink():
        raise CardinalError(f"{run_dir} is a symbolic link; a run folder must be a real folder "
                            "(use another --run-name, or resume the folder it points to)")


def holds_run(run_dir: Path) -> bool:
    return any(os.path.lexists(run_dir / name) for name in RUN_FILES)


def check_fresh(run_dir: Path) -> None:
    if holds_run(run_dir):
        raise CardinalError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it "
                            "or another --run-name to start a new one")


@contextmanager
def run_lock(run_dir: Path, remove_on_error: bool = False) -> Iterator[None]:
    """Hold the run folder's lock (main process only); a folder in use is one clear error.
    ``remove_on_error``: the caller created the folder and removes it if the run fails to start; the lock
    file goes first, while still held, so no other process ever locks a file that is being removed."""
    if not is_main_rank():
        yield
        return
    path = run_dir / LOCK_NAME
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise CardinalError(f"cannot lock {path}: {error.strerror or error}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            raise CardinalError(f"{run_dir} is in use by another cardinal process{holder}; wait for it to end "
                                "or use another --run-name") from None
        try:
            _write_holder(handle, run_dir)
            yield
        except BaseException:
            if remove_on_error:
                with suppress(OSError):
                    path.unlink()
            raise
    finally:
        os.close(handle)  # releases the lock


def _write_holder(handle: int, run_dir: Path) -> None:
    """The lock file names its holder, for the error another process gets (a full disk fails here)."""
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
    except OSError as error:
        raise cannot_write_folder(run_dir, error) from None


def _holder(handle: int) -> str:
    try:
        pid = os.pread(handle, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
