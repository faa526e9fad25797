"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from cardinal.cli import CardinalError
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
    with folders_made_for(path.parent):
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


@contextmanager
def folders_made_for(folder: Path, remove_on_failure: bool = True) -> Iterator[list]:
    """Yield the folders missing on the way to ``folder`` (deepest first), which the block may create; if the
    block fails, those it left empty are removed again, so a failed start leaves no trace."""
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        yield created
    except BaseException:
        if remove_on_failure:
            remove_empty(created)
        raise


def remove_empty(folders) -> None:
    for path in folders:  # deepest first; rmdir removes only empty folders
        with suppress(OSError):
            path.rmdir()


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


def write_text_or_raise(path: os.PathLike | str, text: str) -> None:
    """``write_text_atomic`` for a file the user asked for: a failed write is the one line naming the file."""
    try:
        write_text_atomic(path, text)
    except OSError as error:
        raise cannot_write(path, error) from None


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> None:
    """Write, flush to disk, then swap in: a full disk fails here and leaves the old file as it was."""
    with atomic_target(path) as temp:
        _write_synced(temp, data)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_files_atomic(contents: Mapping[Path, Callable[[], bytes]]) -> None:
    """Replace a set of files together (an export: weights, their mean/std, the scripted model). Each file's
    bytes are made (by its callable, one file's at a time in memory) and written beside its target before
    any target is replaced, so a full disk or a read-only folder leaves every old file as it was. The
    renames at the end are one directory operation each. A failure is an OSError naming the file."""
    with ExitStack() as swaps:
        for path, make in contents.items():
            try:
                temp = swaps.enter_context(atomic_target(path))
                _write_synced(temp, make())
            except OSError as error:
                raise OSError(error.errno, error.strerror, str(path)) from None


def cannot_write(path: os.PathLike | str, error: OSError) -> CardinalError:
    """The one line for a failed write: which file, and the system's reason (full disk, read-only, ...)."""
    return CardinalError(f"cannot write {path}: {error.strerror or error}")


def cannot_write_folder(folder: os.PathLike | str, error: OSError) -> CardinalError:
    return CardinalError(f"cannot write to output folder {folder}: {error.strerror or error}")


def resume_after_mending(run_dir: os.PathLike | str) -> str:
    """What a run stopped by a failed write says to do: its folder holds all it had written before."""
    return f"free space or mend the folder, then --resume {run_dir}"


def probe_writable(path: Path, named: Optional[Path] = None) -> None:
    """Create ``path``'s folder and a file beside ``path``, then remove both again: a CardinalError (naming
    ``named``, else ``path``) before hours of work, rather than after, when the result could not be written
    (the write makes the folder)."""
    probe = path.with_name(f".tmp.{path.name}")
    with folders_made_for(path.parent) as created:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise cannot_write(named or path, error) from None
    remove_empty(created)


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
