"""Shared helpers: a generated CIFAR-10, the real CIFAR-10 sample, and running the training CLI as users do.

``cifar_dir`` is a generated CIFAR-10 folder in the official layout (tests/cifar_fixture.py): every data test
runs on it, on any machine. Tests that need the real sample (``../shared/data/cifar10-sample``) are marked
``sample`` (using the ``sample_dir`` fixture marks a test too); where the sample is absent they are deselected,
not skipped, so a fresh clone reports no data-related skips.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cifar_fixture import write_cifar10

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "cifar10-sample"
TINY = ["--arch", "tiny_resnet", "--no-progress"]
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-train", "600", "--synthetic-test", "150",
             "--batch-size", "64"]


def sample_available():
    return (SAMPLE / "cifar-10-batches-py" / "data_batch_1").is_file()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "sample_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sample)
    if sample_available():
        return
    needs_sample = [item for item in items if item.get_closest_marker("sample")]
    if needs_sample:
        config.hook.pytest_deselected(items=needs_sample)
        items[:] = [item for item in items if not item.get_closest_marker("sample")]


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A generated CIFAR-10 (300 train, 100 test images) to pass as --data-dir; shared: copy it before damaging."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture
def cifar_copy(cifar_dir, tmp_path):
    """A private copy of ``cifar_dir`` that a test may damage."""
    return Path(shutil.copytree(cifar_dir, tmp_path / "cifar-copy"))


@pytest.fixture
def sample_dir():
    if not sample_available():
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
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=environment)


def output_tail(done, chars=3000):
    """The end of both streams: a rank that dies at exit leaves its cause on one, the last lines on the other."""
    return done.stdout[-chars:] + done.stderr[-chars:]


def train(args, tmp_path, processes=1, run_name="run", **kwargs):
    done = cli("cardinal.train", [*args, "--output-dir", str(tmp_path), "--run-name", run_name],
               processes, **kwargs)
    assert done.returncode == 0, output_tail(done)
    return pd.read_csv(tmp_path / run_name / "epochs.csv")


class OneProcess:
    """Enough of Accelerator for one process to save a checkpoint."""

    is_main_process = True
    process_index = 0
    num_processes = 1
    scaler = None

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model
