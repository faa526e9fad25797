"""Checkpoints written while the next epoch trains: the loop waits only for a copy, the files hold the state
of the boundary (not what training did since), and a failed write reports at the next wait, keeping the
previous checkpoint."""

import json
import threading

import pytest
import torch

import cardinal.checkpoint as checkpoint
import cardinal.checkpoint_writer as writer_module
import cardinal.train as train_module
from cardinal.checkpoint_writer import CheckpointWriter, HostCopier
from cardinal.cli import CardinalError, run

from conftest import SYNTHETIC, TINY, OneProcess


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()  # momentum buffers exist
    return model, optimizer


class _HeldSaves:
    """torch.save that blocks until released, so a test can act while a write is in flight."""

    def __init__(self, monkeypatch, fail_with=None):
        self.release, self.started = threading.Event(), threading.Event()
        self.fail_with = fail_with
        self.real = torch.save
        monkeypatch.setattr(writer_module.torch, "save", self)

    def __call__(self, obj, path, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            self.started.set()
            assert self.release.wait(30)
            if self.fail_with is not None:
                raise self.fail_with
        self.real(obj, path, *args, **kwargs)


def test_save_returns_before_the_files_are_written_and_they_hold_the_boundary_state(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    at_boundary = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
    held = _HeldSaves(monkeypatch)
    writer = CheckpointWriter(OneProcess(), tmp_path)
    writer.save(model, optimizer, {"epoch": 1})
    assert held.started.wait(30)
    assert checkpoint.checkpoint_dir(tmp_path) is None  # still being written: the loop did not wait for it
    with torch.no_grad():  # the next epoch trains on, in place
        for parameter in model.parameters():
            parameter.add_(1.0)
    optimizer.state[model[0].weight]["momentum_buffer"].add_(5.0)
    held.release.set()
    writer.wait()
    saved = torch.load(tmp_path / "checkpoint" / checkpoint.MODEL_FILE, weights_only=True)
    assert saved.keys() == at_boundary.keys()
    for key, value in at_boundary.items():
        assert torch.equal(saved[key], value), key
    saved_optimizer = torch.load(tmp_path / "checkpoint" / checkpoint.OPTIMIZER_FILE, weights_only=True)
    assert torch.equal(saved_optimizer["state"][0]["momentum_buffer"], momentum)
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["epoch"] == 1
    assert not (tmp_path / ".checkpoint.new").exists()


def test_a_failed_background_write_reports_at_the_next_wait_and_keeps_the_previous_checkpoint(tmp_path,
                                                                                               monkeypatch):
    model, optimizer = _model_and_optimizer()
    writer = CheckpointWriter(OneProcess(), tmp_path)
    writer.save(model, optimizer, {"epoch": 1})
    writer.wait()
    held = _HeldSaves(monkeypatch, fail_with=OSError(28, "No space left on device"))
    writer.save(model, optimizer, {"epoch": 2})  # returns: the failure comes later
    held.release.set()
    with pytest.raises(CardinalError, match="No space left on device; the checkpoint of epoch 1 is kept"):
        writer.wait()
    writer.wait()  # reported once
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["epoch"] == 1
    assert not (tmp_path / ".checkpoint.new").exists()


def test_a_second_save_waits_for_the_first(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    held = _HeldSaves(monkeypatch)
    writer = CheckpointWriter(OneProcess(), tmp_path)
    writer.save(model, optimizer, {"epoch": 1})
    assert held.started.wait(30)
    second = threading.Thread(target=writer.save, args=(model, optimizer, {"epoch": 2}))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # blocked behind the write in flight
    held.release.set()
    second.join(30)
    writer.wait()
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["epoch"] == 2


def test_host_copies_keep_the_structure_share_no_memory_and_reuse_their_buffers():
    state = {"a": torch.arange(4.0), "nested": {"b": [torch.ones(2), 3, "text"]}, "t": (torch.zeros(1), 0.5)}
    copier = HostCopier()
    copied = copier.copy(state)
    assert copied["nested"]["b"][1:] == [3, "text"] and copied["t"][1] == 0.5 and isinstance(copied["t"], tuple)
    state["a"].add_(1)
    state["nested"]["b"][0].add_(1)
    assert torch.equal(copied["a"], torch.arange(4.0)) and torch.equal(copied["nested"]["b"][0], torch.ones(2))
    again = copier.copy(state)
    assert again["a"].data_ptr() == copied["a"].data_ptr()  # the next save writes into the same memory
    assert torch.equal(again["a"], torch.arange(1.0, 5.0)) and torch.equal(again["nested"]["b"][0], 2 * torch.ones(2))
    state["a"] = torch.zeros(5)  # a new shape gets a new buffer
    assert copier.copy(state)["a"].shape == (5,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked buffers need CUDA")
def test_cuda_state_is_copied_into_reused_page_locked_buffers():
    copier = HostCopier()
    state = {"w": torch.arange(6.0, device="cuda").reshape(2, 3)}
    first = copier.copy(state)["w"]
    assert first.is_pinned() and first.device.type == "cpu" and torch.equal(first, torch.arange(6.0).reshape(2, 3))
    state["w"].add_(1)
    second = copier.copy(state)["w"]
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, torch.arange(1.0, 7.0).reshape(2, 3))


@pytest.mark.slow
def test_a_run_whose_background_write_fails_stops_with_one_line_and_keeps_its_records(tmp_path, monkeypatch,
                                                                                         capsys):
    real = writer_module.save_file
    calls = {"big": 0}

    def full_disk_on_the_second_checkpoint(state, path):
        if str(path).endswith(checkpoint.MODEL_FILE):
            calls["big"] += 1
            if calls["big"] == 2:
                raise OSError(28, "No space left on device")
        real(state, path)

    monkeypatch.setattr(writer_module, "save_file", full_disk_on_the_second_checkpoint)
    argv = [*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "32", "--epochs", "3",
            "--batch-size", "32", "--no-export", "--output-dir", str(tmp_path), "--run-name", "full"]
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"the checkpoint of epoch 1 is kept; free space or mend the folder, then --resume {tmp_path / 'full'}" in err
    run_dir = tmp_path / "full"
    assert json.loads((run_dir / "checkpoint" / "trainer.json").read_text())["epoch"] == 1
    rows = (run_dir / "epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # epoch 2's row came before its failed checkpoint; epoch 3's never did
