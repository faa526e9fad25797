"""Run folders survive crashes at any moment and never run code when loaded.

Crash states are built by arranging the folders as a kill at that moment leaves them; every one must
resume to the records an uninterrupted run writes, each epoch exactly once.
"""

import json
import shutil

import pandas as pd
import pytest
import torch

import cardinal.checkpoint as checkpoint
import cardinal.train as train_module
from cardinal.checkpoint_writer import save_checkpoint
from cardinal.cli import run
from cardinal.records import TIMING_COLUMNS

from conftest import SYNTHETIC, TINY, CodeTrap, OneProcess

pytestmark = pytest.mark.slow  # every test resumes real (tiny) runs

ARGS = [*TINY, *SYNTHETIC, "--synthetic-train", "192", "--synthetic-test", "64", "--recipe", "fast",
        "--epochs", "3", "--ema-decay", "0.9", "--no-export"]  # the weight average is part of every checkpoint
COMPARED_OUT = set(TIMING_COLUMNS) | {"run_name", "command"}


def _train(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def _records(run_dir):
    frame = pd.read_csv(run_dir / "epochs.csv")
    return frame[[c for c in frame.columns if c not in COMPARED_OUT]]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-epoch run, and the folder of a run stopped after 2 epochs (checkpoints of 1 and 2)."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("straight", []), ("two", ["--stop-after", "2"]), ("one", ["--stop-after", "1"])):
        with pytest.raises(SystemExit) as exit_info:
            run(train_module.main, [*ARGS, *extra, "--output-dir", str(root), "--run-name", name])
        assert exit_info.value.code == 0
    return root


def _copy(straight, name, tmp_path):
    return shutil.copytree(straight / name, tmp_path / name)


def _resume_and_compare(run_dir, straight, capsys):
    code, err = _train(["--resume", str(run_dir), "--no-progress"], capsys)
    assert code == 0, err
    pd.testing.assert_frame_equal(_records(run_dir), _records(straight / "straight"), check_exact=False, rtol=1e-6)
    assert (run_dir / "checkpoint" / "trainer.json").is_file()
    assert not (run_dir / ".checkpoint.new").exists() and not (run_dir / ".checkpoint.old").exists()


def test_kill_during_the_first_save_resumes_from_epoch_one(straight, tmp_path, capsys):
    run_dir = _copy(straight, "one", tmp_path)
    (run_dir / "checkpoint").rename(run_dir / ".checkpoint.new")
    (run_dir / ".checkpoint.new" / "trainer.json").unlink()  # the save never completed
    _resume_and_compare(run_dir, straight, capsys)


def test_resume_of_a_folder_with_records_but_no_checkpoint_starts_over(straight, tmp_path, capsys):
    run_dir = _copy(straight, "one", tmp_path)
    shutil.rmtree(run_dir / "checkpoint")
    _resume_and_compare(run_dir, straight, capsys)


@pytest.mark.parametrize("arrangement", ["staging-only", "old-and-staging", "old-only", "final-and-staging"])
def test_kill_during_the_swap_resumes_from_the_newest_complete_checkpoint(straight, tmp_path, capsys, arrangement):
    run_dir = _copy(straight, "two", tmp_path)
    one = straight / "one" / "checkpoint"
    if arrangement == "staging-only":  # the only complete checkpoint is the staged one (epoch 2)
        (run_dir / "checkpoint").rename(run_dir / ".checkpoint.new")
    elif arrangement == "old-and-staging":  # killed between the two renames
        (run_dir / "checkpoint").rename(run_dir / ".checkpoint.new")
        shutil.copytree(one, run_dir / ".checkpoint.old")
    elif arrangement == "old-only":  # epoch 2 never completed; records are ahead of the checkpoint
        shutil.rmtree(run_dir / "checkpoint")
        shutil.copytree(one, run_dir / ".checkpoint.old")
    else:  # epoch 2 staged and complete, checkpoint/ still holds epoch 1
        (run_dir / "checkpoint").rename(run_dir / ".checkpoint.new")
        shutil.copytree(one, run_dir / "checkpoint")
    _resume_and_compare(run_dir, straight, capsys)


def test_a_second_crash_never_deletes_the_only_complete_checkpoint(straight, tmp_path, capsys, monkeypatch):
    run_dir = _copy(straight, "one", tmp_path)
    (run_dir / "checkpoint").rename(run_dir / ".checkpoint.new")  # the only complete one is staged
    model = train_module.build_model("tiny_resnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    real_save = torch.save
    saved = []

    def crash_midway(obj, path, *args, **kwargs):
        saved.append(path)
        if len(saved) == 2:  # killed while writing the new checkpoint
            assert checkpoint.checkpoint_dir(run_dir) is not None
            raise OSError(28, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(checkpoint.CardinalError, match="checkpoint of epoch 1 is kept"):
        save_checkpoint(OneProcess(), model, optimizer, run_dir, {"epoch": 2})
    assert json.loads((checkpoint.checkpoint_dir(run_dir) / "trainer.json").read_text())["epoch"] == 1
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    _resume_and_compare(run_dir, straight, capsys)


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "ema.pt", "rng_state_0.pt", "trainer.json"])
@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_a_trapped_checkpoint_file_never_runs_code(straight, tmp_path, capsys, name, how):
    import pickle

    run_dir = _copy(straight, "one", tmp_path)
    marker = tmp_path / "code-ran"
    target = run_dir / "checkpoint" / name
    if how == "torch.save":
        torch.save({"state": CodeTrap(marker)}, target)
    else:
        target.write_bytes(pickle.dumps(CodeTrap(marker)))
    before = (run_dir / "epochs.csv").read_bytes()
    code, err = _train(["--resume", str(run_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert name in err or "trainer.json" in err
    assert not marker.exists()
    assert (run_dir / "epochs.csv").read_bytes() == before


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "ema.pt"])
def test_a_checkpoint_file_of_tensors_in_another_shape_stops_the_resume(straight, tmp_path, capsys, name):
    run_dir = _copy(straight, "one", tmp_path)
    torch.save(torch.zeros(3), run_dir / "checkpoint" / name)  # readable, but not the state it should hold
    before = (run_dir / "epochs.csv").read_bytes()
    code, err = _train(["--resume", str(run_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "does not fit this run" in err, err
    assert (run_dir / "epochs.csv").read_bytes() == before


def test_a_run_whose_checkpoint_was_removed_is_not_started_over(straight, tmp_path, capsys):
    """Records past the first save mean a checkpoint existed: starting over would rewrite them."""
    run_dir = _copy(straight, "two", tmp_path)
    shutil.rmtree(run_dir / "checkpoint")
    before = (run_dir / "epochs.csv").read_bytes()
    code, err = _train(["--resume", str(run_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds no checkpoint, but records epochs past 1" in err
    assert _train(["--resume", str(run_dir), "--save-every", "3"], capsys)[0] == 2  # saved after epoch 1 all the same
    assert (run_dir / "epochs.csv").read_bytes() == before


@pytest.mark.parametrize("name", ["optimizer.pt", "ema.pt"])
def test_a_missing_checkpoint_file_stops_the_resume(straight, tmp_path, capsys, name):
    run_dir = _copy(straight, "one", tmp_path)
    (run_dir / "checkpoint" / name).unlink()
    code, err = _train(["--resume", str(run_dir)], capsys)
    assert code == 2 and f"{name} is missing" in err, err


def test_the_checkpoint_holds_no_pickled_objects(straight):
    folder = straight / "two" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["ema.pt", "model.pt", "optimizer.pt", "rng_state_0.pt",
                                                        "trainer.json"]
    for path in folder.glob("*.pt"):
        torch.load(path, weights_only=True)  # plain tensors and numbers only
    state = json.loads((folder / "trainer.json").read_text())
    assert state["epoch"] == 2 and state["schedule_total_steps"] == 3 * 3 and state["schedule_step"] == 6


def test_resume_with_another_schedule_length_is_refused(straight, tmp_path, capsys):
    run_dir = _copy(straight, "one", tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, err = _train(["--resume", str(run_dir), "--epochs", "5"], capsys)
    assert code == 2 and "splice" in err and "--stop-after" in err, err
    state = run_dir / "checkpoint" / "trainer.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "schedule_total_steps": 99}))
    code, err = _train(["--resume", str(run_dir)], capsys)
    assert code == 2 and "99 steps" in err, err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_eval_only_of_a_checkpoint_reports_its_average_beside_the_model(straight, tmp_path, capsys):
    run_dir = _copy(straight, "two", tmp_path)
    code, err = _train(["--resume", str(run_dir), "--eval-only", "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    last = pd.read_csv(run_dir / "epochs.csv").iloc[-1]
    assert result["test_acc"] == pytest.approx(last["test_acc"]) and result["test_images"] == 64
    assert result["test_acc_ema"] == pytest.approx(last["test_acc_ema"])


def test_a_process_saves_and_restores_only_its_own_gpus_generator():
    assert set(checkpoint.rng_state(torch.device("cpu"))) == {"cpu"}
    one, other = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    assert checkpoint.own_cuda_rng(one, 3) is one  # this version's: the process's own GPU only
    # earlier checkpoints kept every visible GPU's: a resume takes its own, or none when it sees more GPUs
    assert checkpoint.own_cuda_rng([one, other], 1) is other
    assert checkpoint.own_cuda_rng([one, other], 2) is None


def test_restoring_the_saved_generators_draws_the_same_numbers_again():
    saved = checkpoint.rng_state(torch.device("cpu"))
    first = torch.rand(4)
    checkpoint.restore_rng({**saved, "cuda": [torch.zeros(1)]}, torch.device("cpu"))  # a GPU's state: not here
    assert torch.equal(torch.rand(4), first)
