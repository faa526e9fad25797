"""Kills at every named point of the save sequence, and SIGKILLs at random moments, lose no epoch's record:
each killed run resumes to exactly the metrics of an uninterrupted run (timing columns aside)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cardinal.records import TIMING_COLUMNS

DRIVER = Path(__file__).with_name("crash_driver.py")
REPO = Path(__file__).resolve().parents[1]
COMPARED_OUT = set(TIMING_COLUMNS) | {"run_name", "command"}
# Each point in the order a run reaches it (after # : which time): the start, the first save, and the save of
# the last epoch, which replaces an earlier checkpoint.
POINTS = [
    "after-replace:config.json",
    "before-replace:epochs.csv", "after-replace:epochs.csv", "checkpoint-files-written",
    "before-replace:trainer.json", "after-replace:trainer.json", "checkpoint-promoted",
    "before-replace:epochs.csv#2", "after-replace:epochs.csv#2", "checkpoint-files-written#2",
    "before-replace:trainer.json#2", "after-replace:trainer.json#2", "checkpoint-parked",
    "checkpoint-promoted#2", "previous-removed",
]


def _drive(*args):
    done = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _metrics(run_dir):
    frame = pd.read_csv(run_dir / "epochs.csv")
    return frame[[c for c in frame.columns if c not in COMPARED_OUT]]


def _assert_same_records(run_dir, straight):
    pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(straight), check_exact=True)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint")) == []


@pytest.mark.slow
def test_a_kill_at_every_point_of_the_save_sequence_resumes_to_the_uninterrupted_records(tmp_path):
    codes = _drive("points", tmp_path, *POINTS)
    for index, point in enumerate(POINTS):
        assert codes[point] == [137, 0], (point, codes[point])  # killed there, then resumed to the end
        _assert_same_records(tmp_path / f"point{index}", tmp_path / "straight")


@pytest.mark.slow
def test_random_sigkills_lose_no_record(tmp_path):
    result = _drive("random", tmp_path, 30, 7)
    assert result["killed"] >= 30
    for name, codes in result["runs"].items():
        assert codes[-1] == 0, (name, codes)
        _assert_same_records(tmp_path / name, tmp_path / "straight")
