"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cardinal.crash import crash_point


@contextmanager
def atomic_target(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); it replaces ``path`` if the block succeeds.

    A symlink is followed: its target is replaced and the link kept. A stream cannot be replaced: a FIFO,
    device or socket, or the process's own streams (``/dev/stdout``, ``/dev/fd/N``, ``/proc/...``) get what
    the block wrote appended to them (``/dev/full`` is an OSError, and the device stays a device)."""
    if is_stream(Path(path)):
        with tempfile.TemporaryDirectory(prefix="cardinal-") as folder:
            temp = Path(folder) / Path(path).name
            yield temp
            with open(temp, "rb") as source, open(path, "ab") as target:
                shutil.copyfileobj(source, target)
        return
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp.{path.name}")
    try:
        yield temp
        crash_point(f"before-replace:{path.name}")
        os.replace(temp, path)
        crash_point(f"after-replace:{path.name}")
    finally:
        if temp.exists():
            temp.unlink()


STREAM_PATHS = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/")  # links to whatever the stream is


def is_stream(path: Path) -> bool:
    """Written into, never replaced: a FIFO, device or socket, or a name of one of this process's streams
    (which may stand for a regular file the shell redirected to)."""
    if str(path).startswith(STREAM_PATHS):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> None:
    """Write, flush to disk, then swap in: a full disk fails here and leaves the old file as it was."""
    with atomic_target(path) as temp, open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_regular_file(path: os.PathLike | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. A FIFO or a device (even behind a symlink) is
    refused without blocking or reading from it; OSError (with a reason) otherwise."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if status.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes")
        with os.fdopen(handle, "rb", closefd=False) as stream:
            data = stream.read(max_bytes + 1)
    finally:
        os.close(handle)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes")
    return data
