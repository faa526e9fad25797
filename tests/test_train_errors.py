"""Every error a user can cause exits 2 with one clear line, no traceback, and keeps what was written."""

import os
import pickle

import pandas as pd
import pytest

import cardinal.train as train_module
from cardinal.cli import run
from cardinal.engine import NonFiniteLoss
from conftest import SYNTHETIC, TINY


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def _one_line(code, err, *fragments):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def _corrupt_copy(sample_dir, tmp_path, damage):
    target = tmp_path / "cifar-10-batches-py"
    target.mkdir()
    for source in (sample_dir / "cifar-10-batches-py").iterdir():
        (target / source.name).write_bytes(source.read_bytes())
    damage(target / "data_batch_3")
    return tmp_path


@pytest.mark.parametrize("argv, fragments", [
    (["--arch", "resnet51"], ["invalid choice", "resnet51"]),
    (["--epochs", "0"], ["--epochs", "positive"]),
    (["--batch-size", "-4"], ["--batch-size", "positive"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "abc"], ["--lr"]),
    (["--dataset", "imagenet"], ["--dataset"]),
])
def test_bad_flags(capsys, argv, fragments):
    _one_line(*_run_cli(argv, capsys), *fragments)


def test_missing_data_dir(tmp_path, capsys):
    code, err = _run_cli([*TINY, "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)], capsys)
    _one_line(code, err, "not found", "--download")


def test_truncated_batch_is_named(tmp_path, capsys, sample_dir):
    data = _corrupt_copy(sample_dir, tmp_path, lambda p: p.write_bytes(p.read_bytes()[:5000]))
    code, err = _run_cli([*TINY, "--data-dir", str(data), "--output-dir", str(tmp_path / "o")], capsys)
    _one_line(code, err, "data_batch_3")


def test_batch_with_wrong_structure_is_named(tmp_path, capsys, sample_dir):
    def relabel(path):
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="bytes")
        entry[b"labels"] = [12] * len(entry[b"labels"])
        path.write_bytes(pickle.dumps(entry, protocol=2))
    data = _corrupt_copy(sample_dir, tmp_path, relabel)
    code, err = _run_cli([*TINY, "--data-dir", str(data), "--output-dir", str(tmp_path / "o")], capsys)
    _one_line(code, err, "data_batch_3", "labels outside")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_dir_as_user(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line(*_run_cli([*TINY, *SYNTHETIC, "--output-dir", str(locked)], capsys), "cannot write")


def test_output_path_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _one_line(*_run_cli([*TINY, *SYNTHETIC, "--output-dir", str(blocker)], capsys), "cannot write")


@pytest.fixture
def finished_run(tmp_path, capsys):
    argv = [*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "64", "--epochs", "1",
            "--no-export", "--output-dir", str(tmp_path), "--run-name", "r"]
    code, err = _run_cli(argv, capsys)
    assert code == 0, err
    return tmp_path / "r"


@pytest.mark.parametrize("argv, fragments", [
    (["--arch", "tiny_resnext"], ["--arch", "tiny_resnet", "tiny_resnext"]),
    (["--dataset", "cifar10"], ["--dataset", "synthetic"]),
    (["--lr", "0.5"], ["--lr"]),
])
def test_resume_mismatch_is_refused(finished_run, capsys, argv, fragments):
    before = (finished_run / "epochs.csv").read_bytes()
    _one_line(*_run_cli(["--resume", str(finished_run), *argv], capsys), "cannot resume", *fragments)
    assert (finished_run / "epochs.csv").read_bytes() == before


def test_starting_over_an_existing_run_is_refused(finished_run, capsys):
    argv = [*TINY, *SYNTHETIC, "--output-dir", str(finished_run.parent), "--run-name", finished_run.name]
    _one_line(*_run_cli(argv, capsys), "already holds a run", "--resume")


def test_resume_from_a_folder_without_a_run(tmp_path, capsys):
    _one_line(*_run_cli(["--resume", str(tmp_path)], capsys), "cannot resume")


def test_non_finite_loss_stops_and_keeps_csv_and_checkpoint(tmp_path, capsys, monkeypatch):
    real = train_module.train_epoch
    calls = []

    def diverge_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise NonFiniteLoss("step 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", diverge_in_epoch_two)
    argv = [*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "64", "--epochs", "3",
            "--output-dir", str(tmp_path), "--run-name", "r"]
    _one_line(*_run_cli(argv, capsys), "NaN", "epoch 2", "checkpoint of epoch 1")
    assert list(pd.read_csv(tmp_path / "r" / "epochs.csv")["epoch"]) == [1]
    assert (tmp_path / "r" / "checkpoint" / "trainer.json").is_file()


def test_interrupted_checkpoint_swap_is_recovered(finished_run, capsys):
    """A crash between the two renames leaves only .checkpoint.old; resume must find it, and the next
    save must not trip over leftovers."""
    (finished_run / "checkpoint").rename(finished_run / ".checkpoint.old")
    (finished_run / ".checkpoint.new").mkdir()  # a half-written staging folder (no trainer.json)
    code, err = _run_cli(["--resume", str(finished_run), "--epochs", "2"], capsys)
    assert code == 0, err
    assert list(pd.read_csv(finished_run / "epochs.csv")["epoch"]) == [1, 2]
    assert (finished_run / "checkpoint" / "trainer.json").is_file()
    assert not (finished_run / ".checkpoint.old").exists() and not (finished_run / ".checkpoint.new").exists()


def test_eval_only_uses_the_runs_own_normalization(tmp_path):
    from cardinal.config import CIFAR10_STD, RECIPES, TrainConfig
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(TrainConfig(recipe=RECIPES["fast"]).to_json())
    recipe = train_module._training_normalization(run_dir / "model_state.pt", RECIPES["seed"])
    assert recipe.std == CIFAR10_STD and recipe.lr == RECIPES["seed"].lr
    assert train_module._training_normalization(tmp_path / "w.pt", RECIPES["seed"]) == RECIPES["seed"]


def test_init_weights_of_another_arch_is_one_line(tmp_path, capsys):
    import torch
    from cardinal import build_model
    torch.save(build_model("tiny_resnext").state_dict(), tmp_path / "w.pt")
    code, err = _run_cli([*TINY, *SYNTHETIC, "--init-weights", str(tmp_path / "w.pt"), "--output-dir",
                          str(tmp_path / "o")], capsys)
    _one_line(code, err, "does not match", "tiny_resnet")
