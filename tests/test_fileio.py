"""Atomic writes keep what the user pointed at: a symlink stays a link to the new file, and a stream (a FIFO,
a device, ``--output /dev/stdout``) receives the bytes instead of being replaced by a regular file."""

import os
import stat
import threading

from cardinal.fileio import write_text_atomic


def test_a_symlink_keeps_pointing_at_the_replaced_file(tmp_path):
    target = tmp_path / "results" / "summary.txt"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.txt"
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.txt"]  # no temporary file left


def test_a_fifo_receives_the_bytes_and_stays_a_fifo(tmp_path):
    """A FIFO stands for every file that cannot be replaced (a device too), without touching the real ones."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_text_atomic(fifo, "a,b\n1,2\n")
    reader.join(timeout=20)
    assert received == ["a,b\n1,2\n"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_stream_redirected_to_a_file_is_appended_to_not_replaced(tmp_path):
    """``--output /dev/stdout`` under ``>> log.txt``: the log keeps what was in it and gains the output."""
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    inode = os.stat(log).st_ino
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        write_text_atomic(f"/dev/fd/{descriptor}", "summary\n")
    finally:
        os.close(descriptor)
    assert log.read_text() == "earlier\nsummary\n" and os.stat(log).st_ino == inode
