"""The comparison summary, on runs made by the study runner and on hand-made records."""

import io
import json
import sys

import pandas as pd
import pytest

from cardinal import summary
from cardinal.cli import run
from cardinal.records import RunRecords
from conftest import cli

ARCHS = ("tiny_resnet", "tiny_resnext")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A real study: two tiny archs x two seeds, 3 epochs each, on synthetic data."""
    root = tmp_path_factory.mktemp("study")
    done = cli("cardinal.study", ["--archs", *ARCHS, "--seeds", "0", "1", "--epochs", "3", "--dataset",
                                  "synthetic", "--output-dir", str(root), "--launcher", sys.executable,
                                  "--summary-format", "markdown", "--report-epochs", "1", "3", "--",
                                  "--synthetic-train", "256", "--synthetic-test", "96", "--batch-size", "64",
                                  "--no-progress", "--no-export"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _summary(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(summary.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_study_leaves_one_run_per_arch_and_seed_and_a_summary(study):
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == sorted(
        f"{arch}-seed-synthetic-seed{seed}" for arch in ARCHS for seed in (0, 1))
    text = (study / "summary.md").read_text()
    assert "## Results" in text and "## Takeaways" in text and all(arch in text for arch in ARCHS)
    assert json.loads((study / "study.json").read_text())["archs"] == list(ARCHS)


def test_study_skips_finished_runs(study):
    done = cli("cardinal.study", ["--archs", *ARCHS, "--seeds", "0", "1", "--epochs", "3", "--dataset",
                                  "synthetic", "--output-dir", str(study), "--launcher", sys.executable, "--no-summary"])
    assert done.returncode == 0 and done.stdout.count("skipped") == 4


def _csvs(study, arch):
    return [pd.read_csv(study / f"{arch}-seed-synthetic-seed{seed}" / "epochs.csv") for seed in (0, 1)]


def test_csv_output_matches_the_run_records(study, capsys):
    code, out, _ = _summary([study, "--format", "csv", "--epochs", "1", "2", "3"], capsys)
    assert code == 0
    table = pd.read_csv(io.StringIO(out))
    assert len(table) == len(ARCHS) * 3
    for arch in ARCHS:
        runs = _csvs(study, arch)
        for epoch in (1, 2, 3):
            row = table[(table["arch"] == arch) & (table["epoch"] == epoch)].iloc[0]
            values = pd.Series([r.loc[r["epoch"] == epoch].iloc[0] for r in runs])
            for column in ("train_loss", "test_acc", "img_per_s", "it_per_s", "epoch_time_s"):
                column_values = pd.Series([v[column] for v in values])
                assert row[column] == pytest.approx(column_values.mean(), rel=1e-9)
                assert row[f"{column}_std"] == pytest.approx(column_values.std(ddof=1), rel=1e-9, abs=1e-12)
            assert row["runs"] == 2 and row["params"] == runs[0]["params"].iloc[0]


def test_table_shows_the_numbers_and_takeaways(study, capsys):
    code, out, _ = _summary([study], capsys)
    assert code == 0
    runs = _csvs(study, "tiny_resnet")
    mean_acc = sum(r["test_acc"].iloc[-1] for r in runs) / 2
    assert f"{mean_acc:.2f} ±" in out
    assert "Model" in out and "Epoch" in out and "img/s" in out and "TFLOP/s" in out
    assert "trains at" in out and "per FLOP" in out and "best mean test accuracy" in out


def test_markdown_parses_into_tables(study, capsys, tmp_path):
    code, out, _ = _summary([study, "--format", "markdown", "--output", tmp_path / "s.md"], capsys)
    assert code == 0 and (tmp_path / "s.md").read_text() == out
    results = [line for line in out.split("## Models")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in results[0].strip("|").split("|")]
    assert header[:4] == ["Model", "Epoch", "Train Loss", "Test Acc %"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in results[2:]]
    assert all(len(cells) == len(header) for cells in body)
    assert {int(cells[1]) for cells in body} == {1, 3}  # default: epochs 1, 5 (absent) and the last


def test_plot_is_a_png(study, capsys, tmp_path):
    code, _, _ = _summary([study, "--plot", tmp_path / "plot.png"], capsys)
    assert code == 0
    data = (tmp_path / "plot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "plot.png").shape[0] > 100


def _record(run_dir, arch, seed, accs, planned=None):
    records = RunRecords(run_dir, {"arch": arch, "dataset": "cifar10", "recipe": "seed", "params": 10,
                                   "gflops": 1.0, "seed": seed})
    for epoch, acc in enumerate(accs, 1):
        records.add({"epoch": epoch, "train_loss": 1.0 / epoch, "test_acc": acc, "it_per_s": 1.0,
                     "img_per_s": 100.0 * (seed + 1), "epoch_time_s": 5.0, "train_tflop_per_s": 0.3})
    if planned:
        (run_dir / "config.json").write_text(json.dumps({"recipe": {"epochs": planned}}))


def test_seeds_aggregate_to_mean_and_std(tmp_path):
    for seed, accs in enumerate(([50.0, 60.0], [54.0, 64.0], [58.0, 71.0])):
        _record(tmp_path / f"s{seed}", "a", seed, accs)
    _, results, models, _ = summary.summarize([tmp_path], epochs=[2])
    row = results.iloc[0]
    assert row["test_acc"] == pytest.approx(65.0) and row["test_acc_std"] == pytest.approx(5.567764, rel=1e-6)
    assert row["runs"] == 3 and models.iloc[0]["runs"] == 3


def test_runs_of_different_lengths_and_in_progress(tmp_path):
    _record(tmp_path / "long", "a", 0, [50.0, 60.0, 70.0, 71.0, 72.0, 73.0])
    _record(tmp_path / "short", "b", 0, [40.0, 45.0], planned=10)
    _, results, models, lines = summary.summarize([tmp_path])
    assert sorted(results[results["arch"] == "a"]["epoch"]) == [1, 5, 6]
    assert sorted(results[results["arch"] == "b"]["epoch"]) == [1, 2]
    assert models.set_index("arch").loc["b", "in_progress"] == 1
    assert any("still in progress" in line for line in lines)
    assert any("At epoch 1" in line and "-10.00 points" in line for line in lines)


@pytest.mark.parametrize("content, fragment", [
    (None, "no epochs.csv"),
    ("", "cannot read"),
    ("epoch,loss\n1,2\n", "missing columns"),
    ("\x00\x01garbage\n,,\n", "missing columns"),
])
def test_empty_or_malformed_input_exits_2(tmp_path, capsys, content, fragment):
    if content is not None:
        (tmp_path / "epochs.csv").write_text(content)
    code, _, err = _summary([tmp_path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_missing_path_exits_2(tmp_path, capsys):
    code, _, err = _summary([tmp_path / "nope"], capsys)
    assert code == 2 and "does not exist" in err


def test_plot_without_matplotlib_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import builtins
    _record(tmp_path / "r", "a", 0, [50.0])
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = _summary([tmp_path, "--plot", tmp_path / "p.png"], capsys)
    assert code == 2 and "cardinal[plot]" in err


def test_runs_on_different_datasets_are_told_apart(tmp_path):
    _record(tmp_path / "a", "net", 0, [50.0])
    records = RunRecords(tmp_path / "b", {"arch": "net", "dataset": "cifar100", "recipe": "seed", "params": 10,
                                          "gflops": 1.0, "seed": 0})
    records.add({"epoch": 1, "train_loss": 1.0, "test_acc": 20.0, "it_per_s": 1.0, "img_per_s": 10.0,
                 "epoch_time_s": 1.0, "train_tflop_per_s": 0.1})
    _, results, models, lines = summary.summarize([tmp_path])
    assert sorted(models["model"]) == ["net (seed, cifar10)", "net (seed, cifar100)"]
    assert any("-30.00 points" in line for line in lines)


def test_a_run_named_twice_counts_once(tmp_path):
    _record(tmp_path / "r", "a", 0, [50.0])
    _, results, models, _ = summary.summarize([tmp_path, tmp_path / "r", tmp_path / "r" / "epochs.csv"])
    assert results.iloc[0]["runs"] == 1 and models.iloc[0]["runs"] == 1


def test_study_refuses_records_without_a_checkpoint(tmp_path, capsys):
    from cardinal import study as study_module
    _record(tmp_path / "tiny_resnet-seed-synthetic-seed0", "tiny_resnet", 0, [50.0])
    with pytest.raises(SystemExit) as exit_info:
        run(study_module.main, ["--archs", "tiny_resnet", "--dataset", "synthetic", "--output-dir",
                                str(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no checkpoint" in err and len(err.strip().splitlines()) == 1


def test_study_bad_launcher_is_one_line(tmp_path, capsys):
    from cardinal import study as study_module
    with pytest.raises(SystemExit) as exit_info:
        run(study_module.main, ["--archs", "tiny_resnet", "--output-dir", str(tmp_path), "--dry-run",
                                "--launcher", "accelerate launch 'unclosed"])
    assert exit_info.value.code == 2 and "--launcher" in capsys.readouterr().err
