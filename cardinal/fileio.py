"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cardinal.crash import crash_point


@contextmanager
def atomic_target(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); it replaces ``path`` if the block succeeds."""
    path = Path(path)
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


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> None:
    """Write, flush to disk, then swap in: a full disk fails here and leaves the old file as it was."""
    with atomic_target(path) as temp, open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
