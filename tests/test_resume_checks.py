"""Nothing in a run folder is trusted blindly: every damaged, planted or foreign file, a busy folder and an
out-of-range field stop a start or a resume with one line and exit 2, and change no file."""

import contextlib
import fcntl
import io
import json
import os
import shutil

import pandas as pd
import pytest
from test_train_errors import _one_line

import cardinal.train as train_module
from cardinal.cli import run

from conftest import SYNTHETIC, TINY

pytestmark = pytest.mark.slow  # one tiny run, trained once, then copied for every case

ARGS = [*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "64", "--epochs", "3", "--no-export"]


def _train(argv, capsys=None):
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, argv)
    err = capsys.readouterr().err.strip() if capsys else ""
    return exit_info.value.code, err


def _snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p)
                                    if p.is_symlink() else None)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run stopped after 2 of 3 epochs, in an output folder and under a run name that rich would read as
    markup; what it printed."""
    root = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code, _ = _train([*ARGS, "--stop-after", "2", "--output-dir", str(root / "o[/x]"), "--run-name",
                          "exp[test]"])
    assert code == 0
    return root / "o[/x]" / "exp[test]", printed.getvalue()


@pytest.fixture
def run_dir(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "run")


def _refused(run_dir, capsys, *fragments, argv=()):
    before = _snapshot(run_dir)
    _one_line(*_train(["--resume", str(run_dir), *argv], capsys), *fragments)
    assert _snapshot(run_dir) == before


def test_paths_with_brackets_print_as_typed(saved):
    run_dir, printed = saved
    assert f"records in {run_dir / 'epochs.csv'}" in printed.replace("\n", "")
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1, 2]


def _edit_state(run_dir, **changes):
    path = run_dir / "checkpoint" / "trainer.json"
    state = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not ...}))


@pytest.mark.parametrize("changes, fragments", [
    ({"epoch": -3}, ["epoch", "-3"]),
    ({"epoch": 1.9}, ["epoch", "1.9"]),
    ({"epoch": True}, ["epoch", "True"]),
    ({"epoch": "abc"}, ["epoch", "abc"]),
    ({"epoch": 99}, ["epoch", "from 1 to 3", "99"]),
    ({"global_step": ...}, ["global_step", "None"]),
    ({"global_step": "abc"}, ["global_step", "abc"]),
    ({"global_step": 3, "schedule_step": 3}, ["does not match", "global_step 3"]),  # in range, not the rows' sum
    ({"schedule_step": 1e6}, ["schedule_step", "1000000.0"]),
    ({"schedule_step": 10**6}, ["schedule_step", "1000000"]),
    ({"schedule_total_steps": 0}, ["schedule_total_steps"]),
])
def test_a_tampered_trainer_state_is_refused(run_dir, capsys, changes, fragments):
    _edit_state(run_dir, **changes)
    _refused(run_dir, capsys, "trainer.json", *fragments)


def test_a_planted_staging_folder_is_not_promoted(run_dir, capsys):
    """A complete-looking .checkpoint.new of epoch 3: no row of epoch 3 was ever written, so it was never saved."""
    shutil.copytree(run_dir / "checkpoint", run_dir / ".checkpoint.new")
    state = json.loads((run_dir / "checkpoint" / "trainer.json").read_text())
    (run_dir / ".checkpoint.new" / "trainer.json").write_text(json.dumps({**state, "epoch": 3}))
    _refused(run_dir, capsys, "epochs.csv", "epoch(s) 3")


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _zero_link(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def _foreign_rows(path):
    frame = pd.read_csv(path)
    frame.loc[frame["epoch"] == 1, "arch"] = "tiny_resnext"
    frame.to_csv(path, index=False)


def _edit_column(column, values):
    def edit(path):
        frame = pd.read_csv(path)
        frame[column] = values
        frame.to_csv(path, index=False)
    return edit


def _edit_epochs(values):
    return _edit_column("epoch", values)


@pytest.mark.parametrize("damage, fragments", [
    (_fifo, ["not a regular file"]),
    (_zero_link, ["not a regular file"]),
    (lambda path: path.unlink(), ["is missing", "2 epoch(s)"]),
    (_foreign_rows, ["another run", "arch"]),
    (_edit_epochs([1, 1]), ["repeated or non-whole"]),
    (_edit_epochs([1.5, 2]), ["repeated or non-whole"]),
    (_edit_epochs([2, 3]), ["epoch(s) 1"]),
    (_edit_column("steps", ["x", 5]), ["not numbers in: steps"]),
    (_edit_column("test_acc", ["abc", 50.0]), ["not numbers in: test_acc"]),
])
def test_damaged_records_are_refused_before_use(run_dir, capsys, damage, fragments):
    damage(run_dir / "epochs.csv")
    _refused(run_dir, capsys, "epochs.csv", *fragments)


@pytest.mark.parametrize("field, value", [
    ("save_every", 0), ("eval_batch_size", 0), ("synthetic_train", -5), ("limit_batches", -1), ("seed", True),
    ("download", "yes"), ("log_with", ["nothing"]), ("recipe.crop_padding", 100000), ("recipe.epochs", 2.0),
    ("recipe.lr", 1e308),
])
def test_every_config_field_is_checked_as_its_flag_is(run_dir, capsys, field, value):
    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    if field.startswith("recipe."):
        config["recipe"][field.split(".")[1]] = value
    else:
        config[field] = value
    path.write_text(json.dumps(config))
    flag = "--" + field.split(".")[-1].replace("_", "-")
    _refused(run_dir, capsys, "config.json", flag)


def _hold_lock(run_dir):
    handle = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def test_a_busy_run_folder_refuses_a_resume_and_a_second_start(run_dir, capsys):
    handle = _hold_lock(run_dir)
    try:
        _refused(run_dir, capsys, "in use by another cardinal process")
        _refused(run_dir, capsys, "in use", argv=["--eval-only"])
        before = _snapshot(run_dir)
        code, err = _train([*ARGS, "--output-dir", str(run_dir.parent), "--run-name", run_dir.name], capsys)
        _one_line(code, err, "in use")
        assert _snapshot(run_dir) == before
    finally:
        os.close(handle)  # as when the holder is killed: the next resume goes ahead
    code, err = _train(["--resume", str(run_dir), "--no-progress"], capsys)
    assert code == 0, err
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1, 2, 3]


@pytest.mark.parametrize("keep", ["config.json", "epochs.csv", "checkpoint"])
def test_a_fresh_start_never_reuses_a_folder_holding_a_run(run_dir, capsys, keep):
    for path in run_dir.iterdir():
        if path.name != keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = _snapshot(run_dir)
    code, err = _train([*ARGS, "--output-dir", str(run_dir.parent), "--run-name", run_dir.name], capsys)
    _one_line(code, err, "already holds a run", f"--resume {run_dir}", "--run-name")
    assert _snapshot(run_dir) == before


def test_a_run_folder_that_is_a_symlink_is_refused(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r").symlink_to(elsewhere)
    code, err = _train([*ARGS, "--output-dir", str(tmp_path / "out"), "--run-name", "r"], capsys)
    _one_line(code, err, "symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_two_ranks_start_and_resume_under_the_main_ranks_lock(tmp_path):
    from conftest import cli, output_tail

    args = [*ARGS, "--output-dir", str(tmp_path), "--run-name", "r"]
    done = cli("cardinal.train", [*args, "--stop-after", "1"], processes=2)
    assert done.returncode == 0, output_tail(done)
    done = cli("cardinal.train", ["--resume", str(tmp_path / "r"), "--stop-after", "1"], processes=2)
    assert done.returncode == 0, output_tail(done)
    frame = pd.read_csv(tmp_path / "r" / "epochs.csv")
    assert list(frame["epoch"]) == [1, 2] and frame["world_size"].eq(2).all()
    handle = _hold_lock(tmp_path / "r")
    try:
        done = cli("cardinal.train", ["--resume", str(tmp_path / "r")], processes=2)
    finally:
        os.close(handle)
    assert done.returncode != 0 and "in use by another cardinal process" in done.stderr, output_tail(done)
    assert list(pd.read_csv(tmp_path / "r" / "epochs.csv")["epoch"]) == [1, 2]
