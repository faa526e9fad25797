"""Shared helpers: the real CIFAR-10 sample, and running the training CLI as users do."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "cifar10-sample"
TINY = ["--arch", "tiny_resnet", "--no-progress"]
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-train", "600", "--synthetic-test", "150",
             "--batch-size", "64"]


@pytest.fixture
def sample_dir():
    if not (SAMPLE / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"the CIFAR-10 sample is not at {SAMPLE}")
    return SAMPLE


def cli(module, args, processes=1, timeout=600, env=None):
    """Run ``python -m module`` (or a 2-rank CPU accelerate launch) and return the CompletedProcess."""
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if processes == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        environment["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", str(29400 + os.getpid() % 500),
                   "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def train(args, tmp_path, processes=1, run_name="run", **kwargs):
    done = cli("cardinal.train", [*args, "--output-dir", str(tmp_path), "--run-name", run_name],
               processes, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return pd.read_csv(tmp_path / run_name / "epochs.csv")
