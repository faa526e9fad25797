"""How many CPU threads a training process uses.

``accelerate launch`` without a config exports ``OMP_NUM_THREADS=1`` to the script, which trains a CPU
run on a single core. Unless the user asked for a thread count (``OMP_NUM_THREADS`` in their own
environment, or ``--num_cpu_threads_per_process``), each process gets the cores available to it divided
by the processes on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

LAUNCHER_MARK = "ACCELERATE_DYNAMO_BACKEND"  # set by `accelerate launch` for the script it starts


def launched_by_accelerate() -> bool:
    """Whether ``accelerate launch`` started this process (it exports its settings to the script)."""
    return LAUNCHER_MARK in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _launcher_environ(pid: int) -> Optional[tuple]:
    """(environment, command line) the launcher process was started with, or None if unreadable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return {item.split(b"=", 1)[0].decode(errors="replace") for item in environ if b"=" in item}, cmdline


def user_chose_threads() -> bool:
    """Whether the thread count in the environment comes from the user rather than the launcher."""
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    if LAUNCHER_MARK not in os.environ:
        return True  # started directly: the variable is the user's
    for pid in (os.getppid(), _grandparent()):
        launcher = _launcher_environ(pid) if pid else None
        if launcher is None:
            return True  # cannot tell: respect it
        names, cmdline = launcher
        if any(arg.startswith(b"--num_cpu_threads_per_process") for arg in cmdline):
            return True
        if any(arg.endswith(b"accelerate") or b"accelerate.commands.launch" in arg for arg in cmdline):
            return "OMP_NUM_THREADS" in names
    return True


def _grandparent() -> Optional[int]:
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def threads_per_process(local_processes: int) -> int:
    if user_chose_threads():
        try:
            return max(1, int(os.environ["OMP_NUM_THREADS"]))
        except ValueError:
            pass
    return max(1, available_cores() // max(1, local_processes))


def use_cpu_threads(local_processes: int) -> int:
    """Set torch's intra-op threads by the rule above and return the count."""
    import torch

    threads = threads_per_process(local_processes)
    torch.set_num_threads(threads)
    return threads
