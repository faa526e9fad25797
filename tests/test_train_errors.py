"""Every error a user can cause exits 2 with one clear line, no traceback, and keeps what was written."""

import errno
import json
import os
import pickle

import pandas as pd
import pytest

import cardinal.fileio
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
    (["--seed", "-1"], ["--seed", "between 0 and"]),
    (["--seed", "99999999999"], ["--seed", "between 0 and"]),
    (["--warmup-epochs", "inf"], ["--warmup-epochs", "finite"]),
    (["--std", "inf", "inf", "inf"], ["--std"]),
    (["--mean", "nan", "nan", "nan"], ["--mean", "finite"]),
    (["--lr", "nan"], ["--lr"]),
    (["--label-smoothing", "1.5"], ["--label-smoothing"]),
    (["--head-lr-scale", "0"], ["--head-lr-scale", "(0, 1]"]),
    (["--optimizer", "adam"], ["--optimizer", "invalid choice"]),
    (["--recipe", "seed", "--optimizer", "adamw"], ["--optimizer adamw on --recipe seed needs --lr"]),
    (["--head-lr-scale", "nan"], ["--head-lr-scale", "finite"]),
    (["--max-steps", "-3"], ["--max-steps"]),
    (["--run-name", "../../x"], ["--run-name", "single file or folder name"]),
    (["--run-name", "/tmp/abs"], ["--run-name", "single file or folder name"]),
    (["--run-name", ".."], ["--run-name", "single file or folder name"]),
    (["--log-with", "neptune"], ["--log-with"]),
    (["--lr", "1e308"], ["--lr", "at most 1000"]),
    (["--crop-padding", "100000"], ["--crop-padding", "between 0 and 32"]),
    (["--synthetic-train", "100000000000"], ["--synthetic-train", "between 1 and 100000"]),
    (["--synthetic-classes", "1"], ["--synthetic-classes"]),
    (["--grad-accum", "1000"], ["--grad-accum", "--batch-size"]),
])
def test_bad_flags(capsys, tmp_path, argv, fragments):
    _one_line(*_run_cli([*argv, "--output-dir", str(tmp_path)], capsys), *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_data_dir_leaves_no_run_folder(tmp_path, capsys):
    code, err = _run_cli([*TINY, "--data-dir", str(tmp_path / "nowhere"), "--no-download", "--output-dir",
                          str(tmp_path / "out"), "--run-name", "r"], capsys)
    _one_line(code, err, "not found", "--no-download")
    assert not (tmp_path / "out").exists()  # neither the run folder nor the output folder it would have made


def test_offline_download_is_one_line_naming_the_url(tmp_path, capsys, monkeypatch):
    import dataclasses

    import cardinal.data

    unreachable = dataclasses.replace(cardinal.data.DATASETS["cifar10"], url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setitem(cardinal.data.DATASETS, "cifar10", unreachable)
    code, err = _run_cli([*TINY, "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")], capsys)
    _one_line(code, err, "could not download http://127.0.0.1:9/", "--data-dir")


def test_truncated_batch_is_named(tmp_path, capsys, cifar_dir):
    data = _corrupt_copy(cifar_dir, tmp_path, lambda p: p.write_bytes(p.read_bytes()[:5000]))
    code, err = _run_cli([*TINY, "--data-dir", str(data), "--output-dir", str(tmp_path / "o")], capsys)
    _one_line(code, err, "data_batch_3")


def test_batch_with_wrong_structure_is_named(tmp_path, capsys, cifar_dir):
    def relabel(path):
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="bytes")
        entry[b"labels"] = [12] * len(entry[b"labels"])
        path.write_bytes(pickle.dumps(entry, protocol=2))
    data = _corrupt_copy(cifar_dir, tmp_path, relabel)
    code, err = _run_cli([*TINY, "--data-dir", str(data), "--output-dir", str(tmp_path / "o")], capsys)
    _one_line(code, err, "data_batch_3", "labels outside")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_dir_as_user(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line(*_run_cli([*TINY, *SYNTHETIC, "--output-dir", str(locked)], capsys), "cannot write")


@pytest.mark.slow
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
@pytest.mark.slow
def test_resume_mismatch_is_refused(finished_run, capsys, argv, fragments):
    before = (finished_run / "epochs.csv").read_bytes()
    _one_line(*_run_cli(["--resume", str(finished_run), *argv], capsys), "cannot resume", *fragments)
    assert (finished_run / "epochs.csv").read_bytes() == before


@pytest.mark.slow
def test_starting_over_an_existing_run_is_refused(finished_run, capsys):
    argv = [*TINY, *SYNTHETIC, "--output-dir", str(finished_run.parent), "--run-name", finished_run.name]
    _one_line(*_run_cli(argv, capsys), "already holds a run", "--resume")


def test_resume_from_a_folder_without_a_run(tmp_path, capsys):
    _one_line(*_run_cli(["--resume", str(tmp_path)], capsys), "cannot resume")


def _diverge_in_epoch_two(monkeypatch, name, make_result):
    real = getattr(train_module, name)
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        return make_result(*args, **kwargs) if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(train_module, name, patched)


def _raise_non_finite(*args, **kwargs):
    raise NonFiniteLoss("step 1")


def _nan_evaluation(*args, **kwargs):
    from cardinal.engine import EvalStats
    return EvalStats(loss=float("nan"), accuracy=10.0, images=64, time_s=0.1)


@pytest.mark.parametrize("name, make_result, what", [
    ("train_epoch", _raise_non_finite, "training loss"),
    ("evaluate", _nan_evaluation, "test loss"),
])
@pytest.mark.slow
def test_non_finite_training_or_evaluation_stops_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys, monkeypatch, name, make_result, what):
    _diverge_in_epoch_two(monkeypatch, name, make_result)
    argv = [*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "64", "--epochs", "3",
            "--output-dir", str(tmp_path), "--run-name", "r"]
    _one_line(*_run_cli(argv, capsys), "NaN", what, "epoch 2", "checkpoint of epoch 1", "new run")
    assert list(pd.read_csv(tmp_path / "r" / "epochs.csv")["epoch"]) == [1]
    assert json.loads((tmp_path / "r" / "checkpoint" / "trainer.json").read_text())["epoch"] == 1


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"\x80\x81garbage\xff" * 50, b"", b"a,b\n1,2\n", b"epoch,test_acc\nx,y\n"])
def test_unreadable_records_on_resume_are_one_line_and_change_nothing(finished_run, capsys, content):
    (finished_run / "epochs.csv").write_bytes(content)
    before = _snapshot(finished_run)
    _one_line(*_run_cli(["--resume", str(finished_run)], capsys), "epochs.csv")
    assert _snapshot(finished_run) == before


@pytest.mark.parametrize("config", ['[]', '{"arch": "resnet51", "recipe": {}}', '{"recipe": {"lr": -1}}',
                                    'not json', '{"recipe": {"std": [0, 0, 0]}}'])
@pytest.mark.slow
def test_invalid_saved_config_is_one_line_and_changes_nothing(finished_run, capsys, config):
    (finished_run / "config.json").write_text(config)
    before = _snapshot(finished_run)
    _one_line(*_run_cli(["--resume", str(finished_run)], capsys), "config.json")
    assert _snapshot(finished_run) == before


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_full_disk_during_checkpoint_save_keeps_the_previous_one(finished_run, capsys, monkeypatch):
    import cardinal.checkpoint

    before = _snapshot(finished_run)
    monkeypatch.setattr(cardinal.checkpoint.torch, "save", _no_space)
    code, err = _run_cli(["--resume", str(finished_run), "--epochs", "2", "--no-export"], capsys)
    _one_line(code, err, "cannot save a checkpoint", "No space left", "checkpoint of epoch 1 is kept")
    after = _snapshot(finished_run)
    unchanged = lambda snapshot: {k: v for k, v in snapshot.items() if k.name not in ("config.json", "epochs.csv")}  # noqa: E731
    assert unchanged(after) == unchanged(before)
    # the finished epoch's row was written before its checkpoint: a resume trains that epoch again
    assert list(pd.read_csv(finished_run / "epochs.csv")["epoch"]) == [1, 2]


@pytest.mark.slow
def test_full_disk_during_config_write_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cardinal.fileio, "write_text_atomic", _no_space)
    argv = [*TINY, *SYNTHETIC, "--epochs", "1", "--output-dir", str(tmp_path), "--run-name", "r"]
    _one_line(*_run_cli(argv, capsys), "config.json", "No space left")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_full_disk_during_export_is_one_line_and_keeps_the_records(tmp_path, capsys, monkeypatch):
    import cardinal.fileio

    real = cardinal.fileio._write_synced

    def full_at_the_program(path, data):  # the weights, their average and mean/std were written first
        if path.name.endswith(".pt2"):
            _no_space()
        real(path, data)

    monkeypatch.setattr(cardinal.fileio, "_write_synced", full_at_the_program)
    run_dir = tmp_path / "r"
    argv = [*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "64", "--epochs", "1",
            "--ema-decay", "0.9", "--output-dir", str(tmp_path), "--run-name", "r"]
    _one_line(*_run_cli(argv, capsys), f"cannot write {run_dir / 'model.pt2'}: No space left",
              f"then --resume {run_dir} (it only exports)")
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1]
    assert (run_dir / "checkpoint" / "trainer.json").is_file()
    assert not list(run_dir.glob("*model*"))  # no file of the set, nor a temporary one
    monkeypatch.setattr(cardinal.fileio, "_write_synced", real)
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, ["--resume", str(run_dir)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "nothing left to train (checkpoint of epoch 1, step" in out
    assert sorted(path.name for path in run_dir.glob("model*")) == [
        "model.pt2", "model.ts", "model_ema_state.json", "model_ema_state.pt", "model_state.json", "model_state.pt"]


@pytest.mark.slow
def test_full_disk_during_the_records_write_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import cardinal.records

    real, calls = cardinal.records.write_csv, []

    def full_at_the_second_epoch(frame, path):
        calls.append(path)
        if len(calls) == 2:
            _no_space()
        real(frame, path)

    monkeypatch.setattr(cardinal.records, "write_csv", full_at_the_second_epoch)
    argv = [*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "64", "--epochs", "3",
            "--no-export", "--output-dir", str(tmp_path), "--run-name", "r"]
    run_dir = tmp_path / "r"
    _one_line(*_run_cli(argv, capsys), f"cannot write {run_dir / 'epochs.csv'}: No space left on device; "
              f"its earlier rows are kept; free space or mend the folder, then --resume {run_dir}")
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1]
    assert json.loads((run_dir / "checkpoint" / "trainer.json").read_text())["epoch"] == 1
    monkeypatch.setattr(cardinal.records, "write_csv", real)
    code, err = _run_cli(["--resume", str(run_dir)], capsys)
    assert code == 0, err
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1, 2, 3]


@pytest.mark.slow
def test_full_disk_during_the_eval_only_result_is_one_line(finished_run, capsys, monkeypatch):
    monkeypatch.setattr(cardinal.fileio, "write_text_atomic", _no_space)
    code, err = _run_cli(["--resume", str(finished_run), "--eval-only"], capsys)
    _one_line(code, err, f"cannot write {finished_run / 'eval.json'}: No space left on device")


def test_a_full_disk_at_the_lock_is_one_error_and_leaves_no_folder(tmp_path, monkeypatch):
    import cardinal.runlock
    from cardinal.cli import CardinalError

    run_dir = tmp_path / "runs" / "r"
    with monkeypatch.context() as patched, pytest.raises(CardinalError) as error:
        patched.setattr(cardinal.runlock.os, "write", _no_space)  # the lock file's pid: its only os.write
        with train_module.run_folder(run_dir, resuming=False):
            pass
    assert str(error.value) == f"cannot write to output folder {run_dir}: No space left on device"
    assert not (tmp_path / "runs").exists()


def test_eval_only_uses_the_runs_own_normalization(tmp_path):
    from cardinal.config import CIFAR10_STD, RECIPES, TrainConfig
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(TrainConfig(recipe=RECIPES["fast"]).to_json())
    recipe = train_module._training_normalization(run_dir / "model_state.pt", RECIPES["seed"])
    assert recipe.std == CIFAR10_STD and recipe.lr == RECIPES["seed"].lr
    assert train_module._training_normalization(tmp_path / "w.pt", RECIPES["seed"]) == RECIPES["seed"]


@pytest.mark.slow
def test_init_weights_of_another_arch_is_one_line(tmp_path, capsys):
    import torch

    from cardinal import build_model
    torch.save(build_model("tiny_resnext").state_dict(), tmp_path / "w.pt")
    code, err = _run_cli([*TINY, *SYNTHETIC, "--init-weights", str(tmp_path / "w.pt"), "--output-dir",
                          str(tmp_path / "o")], capsys)
    _one_line(code, err, "does not match", "tiny_resnet")


def test_a_clean_run_meets_the_other_ranks_then_leaves_the_process_group_keeping_the_barrier(monkeypatch):
    import torch

    class Ending:
        ended = False

        def end_training(self):
            self.ended = True

    monkeypatch.setattr(train_module, "_LAST_BARRIER", ["an earlier run's barrier"])
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    accelerator = Ending()
    try:
        train_module._close(accelerator, clean=True)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            pytest.fail("the process group was left open")
    assert accelerator.ended
    # the barrier lives as long as the process, so no gloo worker thread is the one to free it at exit; an
    # earlier one is let go while the interpreter runs
    kept = train_module._LAST_BARRIER
    assert len(kept) == 1 and isinstance(kept[0], torch.distributed.Work) and kept[0].is_completed()
