"""Shared helpers: a generated CIFAR-10, the real CIFAR-10 sample, and running the training CLI as users do.

``cifar_dir`` is a generated CIFAR-10 folder in the official layout (tests/cifar_fixture.py): every data test
runs on it, on any machine. Tests that need the real sample (``../shared/data/cifar10-sample``) are marked
``sample`` (using the ``sample_dir`` fixture marks a test too); where the sample is absent they are deselected,
not skipped, so a fresh clone reports no data-related skips.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

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


def suite_environment():
    """Every command's environment: this one, with Python's warnings off (torch's deprecations are noise)."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def cli(module, args, processes=1, timeout=600, env=None):
    """Run ``python -m module`` (or a 2-rank CPU accelerate launch) and return the CompletedProcess.

    One process whose start-up settings are the suite's runs as a fork of ``fork_server.py``: the same
    command, without the interpreter start and imports that took most of a tiny run's time."""
    environment = {**suite_environment(), **(env or {})}
    command = [sys.executable, "-m", module, *map(str, args)]
    if processes == 1 and ForkServer.serves(environment):
        return ForkServer.shared().run(command, environment, timeout)
    if processes > 1:
        environment["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", str(29400 + os.getpid() % 500),
                   "-m", module, *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=environment)


class ForkServer:
    """The suite's one ``tests/fork_server.py`` process, started on first use and ended with the session."""

    # read when an interpreter starts, so a fork keeps the server's: commands that change one get their own
    START_UP = ("PYTHONWARNINGS", "PYTHONHASHSEED", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "CUDA_VISIBLE_DEVICES")
    _shared = None

    def __init__(self):
        self.environment = suite_environment()
        self.folder = Path(tempfile.mkdtemp(prefix="cardinal-fork-server-"))
        with open(self.folder / "server.log", "w") as log:
            self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "fork_server.py")], cwd=REPO,
                                            env=self.environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log, text=True)
        atexit.register(self.close)

    @classmethod
    def shared(cls):
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls()
        return cls._shared

    @classmethod
    def serves(cls, environment):
        started = cls._shared.environment if cls._shared else suite_environment()
        return all(environment.get(name) == started.get(name) for name in cls.START_UP)

    def run(self, command, environment, timeout):
        out, err = self.folder / "stdout", self.folder / "stderr"
        request = {"module": command[2], "argv": command[3:], "env": environment, "cwd": os.getcwd(),
                   "stdout": str(out), "stderr": str(err), "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fork server ended: {(self.folder / 'server.log').read_text()[-3000:]}")
        code = json.loads(reply)["code"]
        if code == -signal.SIGALRM:
            raise subprocess.TimeoutExpired(command, timeout)
        return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def cli_ok(module, args, **kwargs):
    """``cli`` for a command that must succeed."""
    done = cli(module, args, **kwargs)
    assert done.returncode == 0, output_tail(done)
    return done


def output_tail(done, chars=3000):
    """The end of both streams: a rank that dies at exit leaves its cause on one, the last lines on the other."""
    return done.stdout[-chars:] + done.stderr[-chars:]


def train(args, tmp_path, processes=1, run_name="run", **kwargs):
    done = cli("cardinal.train", [*args, "--output-dir", str(tmp_path), "--run-name", run_name],
               processes, **kwargs)
    assert done.returncode == 0, output_tail(done)
    return pd.read_csv(tmp_path / run_name / "epochs.csv")


class CodeTrap:
    """Pickles as a call to os.mkdir: loading it unrestricted would create the marker folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class OneProcess:
    """Enough of Accelerator for one process to save a checkpoint."""

    is_main_process = True
    process_index = 0
    num_processes = 1
    scaler = None
    device = torch.device("cpu")

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model
