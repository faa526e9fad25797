"""Runs tiny trainings in forked children and kills them: at named crash points, or with SIGKILL at random times.

    python tests/crash_driver.py points ROOT POINT...    # one run per point, killed there, then resumed
    python tests/crash_driver.py random ROOT KILLS SEED   # runs killed KILLS times in all, each resumed

Torch and cardinal are imported once, here; every child is a fork that runs ``cardinal.train.main`` as the
command line would, so a kill costs no interpreter start. torch._dynamo too: torch imports it on a run's first
FLOP count or optimizer step, and that import (about 2 s) would otherwise be paid again in every child.
ROOT/straight is the uninterrupted run to compare with. Prints one JSON object: what each child exited with.
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch._dynamo  # noqa: F401  (imported once here, not in every child: see above)

import cardinal.train as train_module
from cardinal.cli import run
from cardinal.crash import CRASH_ENV

ARGS = ["--arch", "tiny_resnet", "--no-progress", "--dataset", "synthetic", "--synthetic-train", "32",
        "--synthetic-test", "16", "--batch-size", "16", "--recipe", "fast", "--epochs", "2", "--ema-decay", "0.9",
        "--no-export"]


def argv_for(run_dir: Path):
    if (run_dir / "config.json").exists():
        return ["--resume", str(run_dir)]
    return [*ARGS, "--output-dir", str(run_dir.parent), "--run-name", run_dir.name]


def start(run_dir: Path, crash_at: str = "") -> int:
    """Fork a child that trains (or resumes) ``run_dir``; returns its pid."""
    argv = argv_for(run_dir)
    pid = os.fork()
    if pid:
        return pid
    try:
        log = os.open(str(run_dir.parent / f"{run_dir.name}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if crash_at:
            os.environ[CRASH_ENV] = crash_at
        run(train_module.main, argv)
    except SystemExit as done:
        os._exit(done.code if isinstance(done.code, int) else 1)
    except BaseException:
        os._exit(3)
    os._exit(0)


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def straight(root: Path) -> float:
    began = time.perf_counter()
    code = wait(start(root / "straight"))
    assert code == 0, f"the uninterrupted run exited {code}"
    return time.perf_counter() - began


def at_points(root: Path, points) -> dict:
    straight(root)
    codes = {}
    for index, point in enumerate(points):
        run_dir = root / f"point{index}"
        codes[point] = [wait(start(run_dir, point)), wait(start(run_dir))]
    return codes


def at_random(root: Path, kills: int, seed: int) -> dict:
    """Kill at a uniform random moment of an uninterrupted run's duration; resume until it finishes."""
    chooser = random.Random(seed)
    duration = straight(root)
    runs, killed, index = {}, 0, 0
    while killed < kills:
        run_dir = root / f"random{index}"
        codes = runs.setdefault(run_dir.name, [])
        pid = start(run_dir)
        time.sleep(chooser.uniform(0, duration * 0.6))
        os.kill(pid, signal.SIGKILL)
        codes.append(wait(pid))
        killed += codes[-1] == -signal.SIGKILL
        if codes[-1] == 0:  # it finished before the kill: a new run takes the next kills
            index += 1
    for name, codes in runs.items():
        if codes[-1] != 0:
            codes.append(wait(start(root / name)))
    return {"killed": killed, "runs": runs}


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    root.mkdir(parents=True, exist_ok=True)
    if mode == "points":
        result = at_points(root, sys.argv[3:])
    else:
        result = at_random(root, int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(result))
