"""The study runner resumes a run with the run's own length; it never splices two LR schedules."""

import json

import pytest

from cardinal import study as study_module
from cardinal.cli import run
from cardinal.config import RECIPES, TrainConfig

NAME = "tiny_resnet-{recipe}-synthetic-seed0"


def _arrange(root, recipe, epochs, done_epochs):
    """A run folder as cardinal.train leaves it: config.json, and a checkpoint of ``done_epochs``."""
    run_dir = root / NAME.format(recipe=recipe)
    (run_dir / "checkpoint").mkdir(parents=True)
    config = TrainConfig(arch="tiny_resnet", dataset="synthetic", recipe_name=recipe,
                         recipe=RECIPES[recipe].__class__(**{**RECIPES[recipe].__dict__, "epochs": epochs}))
    (run_dir / "config.json").write_text(config.to_json())
    (run_dir / "checkpoint" / "trainer.json").write_text(json.dumps({"epoch": done_epochs}))
    return run_dir


def _study(root, recipe, epochs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(study_module.main, ["--archs", "tiny_resnet", "--recipe", recipe, "--epochs", str(epochs),
                                "--dataset", "synthetic", "--output-dir", str(root), "--dry-run"])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_an_interrupted_run_is_resumed_without_changing_its_length(tmp_path, capsys):
    _arrange(tmp_path, "fast", 3, 1)
    code, out, _ = _study(tmp_path, "fast", 3, capsys)
    assert code == 0 and "--resume" in out and "--epochs" not in out


@pytest.mark.parametrize("epochs", [2, 5])
def test_another_length_for_a_length_dependent_schedule_is_refused(tmp_path, capsys, epochs):
    _arrange(tmp_path, "fast", 3, 3)
    code, out, err = _study(tmp_path, "fast", epochs, capsys)
    assert code == 2 and "planned for 3 epochs" in err and "--output-dir" in err and "$" not in out


def test_a_constant_schedule_run_is_lengthened(tmp_path, capsys):
    _arrange(tmp_path, "seed", 2, 2)
    code, out, _ = _study(tmp_path, "seed", 4, capsys)
    assert code == 0 and "--resume" in out and "--epochs 4" in out


def test_a_folder_with_records_but_no_checkpoint_is_resumed_from_the_start(tmp_path, capsys):
    run_dir = _arrange(tmp_path, "fast", 3, 1)
    (run_dir / "checkpoint" / "trainer.json").unlink()
    (run_dir / "epochs.csv").write_text("epoch,test_acc\n1,10.0\n")
    code, out, _ = _study(tmp_path, "fast", 3, capsys)
    assert code == 0 and "--resume" in out  # train restarts it from epoch 1 (tests/test_checkpoint.py)


LAUNCHER_TRACEBACK = """Traceback (most recent call last):
  File "/venv/bin/accelerate", line 8, in <module>
    sys.exit(main())
  File "/venv/lib/accelerate/commands/launch.py", line 1000, in simple_launcher
    raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)
subprocess.CalledProcessError: Command '['python', '-m', 'cardinal.train']' returned non-zero exit status 2.
"""


def test_the_launchers_traceback_is_dropped_and_the_runs_error_held_back():
    import io

    child = ["a warning\n", "error: cifar10 not found in /nowhere\n", *LAUNCHER_TRACEBACK.splitlines(True),
             "Traceback (most recent call last):\n", '  File "x.py", line 1\n', "ValueError: a real crash\n"]
    out = io.StringIO()
    errors = study_module.relay_stderr(child, out)
    assert errors == ["error: cifar10 not found in /nowhere\n"]
    assert out.getvalue() == "a warning\nTraceback (most recent call last):\n  File \"x.py\", line 1\n" \
                             "ValueError: a real crash\n"


def test_the_default_launcher_passes_what_accelerate_would_warn_about(monkeypatch, tmp_path):
    import accelerate.commands.config as accelerate_config

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    command = study_module.default_launcher()
    for flag in ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend", "--quiet"):
        assert flag in command
    (tmp_path / "none.yaml").write_text("num_processes: 1\n")  # the user's own config decides
    assert study_module.default_launcher()[-1] == "--quiet"


@pytest.mark.slow
def test_a_failed_run_ends_the_study_with_one_line_and_no_traceback(tmp_path):
    from conftest import cli, output_tail

    done = cli("cardinal.study", ["--archs", "tiny_resnet", "--epochs", "1", "--data-dir", str(tmp_path / "none"),
                                  "--output-dir", str(tmp_path / "study"), "--", "--no-download"])
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, output_tail(done)
    assert lines[-1].startswith("error: training tiny_resnet (seed 0) failed: cifar10 not found in ")
    assert "run the study again to resume" in lines[-1] and done.stderr.strip().splitlines() == [lines[-1]]
    assert "Traceback" not in done.stdout + done.stderr and "were not passed" not in done.stdout + done.stderr


def test_a_run_trained_but_not_exported_is_resumed_to_export(tmp_path, capsys):
    run_dir = _arrange(tmp_path, "fast", 3, 3)
    (run_dir / "model.ts").write_bytes(b"")  # killed during the export: model.pt2 and the state are missing
    code, out, _ = _study(tmp_path, "fast", 3, capsys)
    assert code == 0 and "--resume" in out and "skipped" not in out
    for name in ("model.pt2", "model_state.pt"):
        (run_dir / name).write_bytes(b"")
    code, out, _ = _study(tmp_path, "fast", 3, capsys)
    assert code == 0 and "skipped" in out and "$" not in out


def test_a_run_without_export_is_done_when_trained(tmp_path, capsys):
    run_dir = _arrange(tmp_path, "fast", 3, 3)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "export": False}))
    code, out, _ = _study(tmp_path, "fast", 3, capsys)
    assert code == 0 and "skipped" in out


def _plan(root, capsys, *flags):
    with pytest.raises(SystemExit) as exit_info:
        run(study_module.main, ["--archs", "tiny_resnet", "--dataset", "synthetic", "--output-dir", str(root),
                                "--launcher", "python", "--dry-run", *flags])
    captured = capsys.readouterr()
    commands = [line.split() for line in captured.out.splitlines() if line.startswith("$ ")]
    return exit_info.value.code, [(c[c.index("--recipe") + 1], int(c[c.index("--epochs") + 1]),
                                   c[c.index("--run-name") + 1]) for c in commands], captured.err


def test_a_study_of_recipes_and_lengths_runs_seed_once_for_the_longest(tmp_path, capsys):
    code, runs, _ = _plan(tmp_path, capsys, "--recipes", "seed", "fast", "--epochs", "5", "1", "--seeds", "0", "1")
    assert code == 0 and runs == [  # a whole replicate at a time
        ("seed", 5, "tiny_resnet-seed-synthetic-e5-seed0"), ("fast", 1, "tiny_resnet-fast-synthetic-e1-seed0"),
        ("fast", 5, "tiny_resnet-fast-synthetic-e5-seed0"), ("seed", 5, "tiny_resnet-seed-synthetic-e5-seed1"),
        ("fast", 1, "tiny_resnet-fast-synthetic-e1-seed1"), ("fast", 5, "tiny_resnet-fast-synthetic-e5-seed1")]


def test_a_length_the_pass_through_flags_make_matter_gives_every_length_its_run(tmp_path, capsys):
    code, runs, _ = _plan(tmp_path, capsys, "--recipes", "seed", "--epochs", "1", "3", "--", "--schedule", "cosine")
    assert code == 0 and [epochs for _, epochs, _ in runs] == [1, 3]  # epoch 1 of a cosine run is no 1-epoch run


def test_one_recipe_and_one_length_keep_the_names_train_gives(tmp_path, capsys):
    code, runs, _ = _plan(tmp_path, capsys, "--recipe", "fast", "--epochs", "3")
    assert code == 0 and runs == [("fast", 3, "tiny_resnet-fast-synthetic-seed0")]


def test_an_unknown_recipe_is_one_line_before_any_run(tmp_path, capsys):
    code, runs, err = _plan(tmp_path, capsys, "--recipes", "seed", "quick")
    assert code == 2 and runs == [] and err.strip() == "error: unknown recipe 'quick'; choose from: seed, fast"


@pytest.mark.parametrize("flags, fragment", [
    (["--seeds", "-1"], "--seeds"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--", "--output-dir", "elsewhere"], "--output-dir: the study sets this for each run"),
    (["--", "--epochs=3", "--resume", "x"], "--epochs, --resume: the study sets this"),
    (["--", "--output", "elsewhere"], "--output-dir: the study sets this"),  # argparse reads an abbreviation
    (["--", "--bogus"], "flags for cardinal.train: unrecognized arguments: --bogus"),
    (["--", "--lr", "fast"], "flags for cardinal.train: argument --lr"),
    (["--batch-size", "0"], "flags for cardinal.train: argument --batch-size"),
    (["--", "--lr", "1001"], "--lr must be positive and at most 1000"),  # parsed, then refused by validation
])
def test_flags_train_would_refuse_are_refused_before_the_plan(tmp_path, capsys, flags, fragment):
    code, runs, err = _plan(tmp_path, capsys, *flags)
    assert code == 2 and runs == [] and fragment in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_real_study_of_two_recipes_at_two_lengths_sets_fast_against_seed_at_each(tmp_path):
    import sys

    from conftest import cli

    done = cli("cardinal.study", ["--archs", "tiny_resnet", "--recipes", "seed", "fast", "--epochs", "1", "2",
                                  "--dataset", "synthetic", "--output-dir", str(tmp_path), "--launcher",
                                  sys.executable, "--summary-format", "markdown", "--",
                                  "--synthetic-train", "128", "--synthetic-test", "64", "--batch-size", "64",
                                  "--no-progress", "--no-export"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "tiny_resnet-fast-synthetic-e1-seed0", "tiny_resnet-fast-synthetic-e2-seed0",
        "tiny_resnet-seed-synthetic-e2-seed0"]
    answer = (tmp_path / "summary.md").read_text().split("## Gaps at the end of runs")[1].split("\n## ")[0]
    gaps = [line for line in answer.splitlines() if line.startswith("| ") and " vs seed" in line]
    assert sorted(line.split("|")[1].strip() for line in gaps) == ["1", "2"]  # seed's epoch 1 stands for a run
    assert json.loads((tmp_path / "study.json").read_text())["runs"] == [
        "tiny_resnet-seed-synthetic-e2-seed0", "tiny_resnet-fast-synthetic-e1-seed0",
        "tiny_resnet-fast-synthetic-e2-seed0"]
