"""TorchScript round trips for every registered architecture; TorchScript and torch.export files loaded in a
fresh process for one architecture of each block structure."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from cardinal import build_model, list_archs
from cardinal.cli import CardinalError
from cardinal.export import (
    Normalization,
    clean_state_dict,
    export_model,
    load_state_dict_file,
    main,
    read_normalization,
    save_state_dict,
    script_model,
)

from conftest import TINY, cli, output_tail

INPUT = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# One architecture per block structure (plain, grouped, fixed bottleneck width, narrow base): the deeper and
# wider siblings repeat or widen these same modules, and exporting them took most of this file's minute.
FRESH_PROCESS_ARCHS = ("resnet50", "resnext50_32x4d", "resnext50_flat128", "tiny_resnext")


@pytest.mark.parametrize("arch", list_archs())
def test_scripted_model_matches_eager(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warning must not leak to the user
        scripted = script_model(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(INPUT), model(INPUT), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each arch exported once as TorchScript + program, with its eager logits saved beside it."""
    root = tmp_path_factory.mktemp("exported")
    torch.save(INPUT, root / "input.pt")
    for arch in FRESH_PROCESS_ARCHS:
        torch.manual_seed(0)
        model = build_model(arch).eval()
        export_model(model, root, arch, formats=("torchscript", "program"))
        with torch.no_grad():
            torch.save(model(INPUT), root / f"{arch}.expected.pt")
    return root


FRESH_PROCESS_CHECK = r"""
import json, sys, warnings
import torch
warnings.simplefilter("ignore")
root, archs = sys.argv[1], sys.argv[2:]
x = torch.load(f"{root}/input.pt")
result = {}
for arch in archs:
    expected = torch.load(f"{root}/{arch}.expected.pt")
    scripted = torch.jit.load(f"{root}/{arch}.ts")
    program = torch.export.load(f"{root}/{arch}.pt2").module()
    with torch.no_grad():
        result[arch] = [(scripted(x) - expected).abs().max().item(),
                        (program(x) - expected).abs().max().item(),
                        tuple(program(x[:1]).shape)]
result["cardinal_imported"] = any(name.startswith("cardinal") for name in sys.modules)
print(json.dumps(result))
"""


@pytest.mark.slow
def test_exported_files_load_without_cardinal_and_give_the_same_logits(exported):
    archs = FRESH_PROCESS_ARCHS
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(exported), *archs],
                          capture_output=True, text=True, cwd=exported, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("cardinal_imported") is False
    for arch in archs:
        script_error, program_error, single_shape = result[arch]
        assert script_error <= 1e-5, arch
        assert program_error <= 1e-5, arch
        assert single_shape == [1, 10], "the program's batch dimension must be dynamic"


def test_export_leaves_the_callers_model_untouched(tmp_path):
    model = build_model("tiny_resnet").train()
    export_model(model, tmp_path, "m", formats=("torchscript",))
    assert model.training and next(model.parameters()).dtype == torch.float32


def test_wrapper_prefixes_are_removed():
    state = {"module._orig_mod.fc.weight": 1, "_orig_mod.fc.bias": 2, "conv1.weight": 3}
    assert clean_state_dict(state) == {"fc.weight": 1, "fc.bias": 2, "conv1.weight": 3}


def test_cli_exports_trained_weights(tmp_path, capsys):
    """Weights saved by hand carry no normalisation: the export says which one it put inside."""
    torch.manual_seed(3)
    trained = build_model("tiny_resnext", num_classes=7)
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "w.pt")
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.4, 0.3)
    with pytest.raises(SystemExit) as code:
        from cardinal.cli import run
        run(main, ["--arch", "tiny_resnext", "--num-classes", "7", "--weights", str(tmp_path / "w.pt"),
                   "--output-dir", str(tmp_path / "out"), "--formats", "torchscript", "state_dict",
                   "--mean", *map(str, mean), "--std", *map(str, std)])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "carries no normalisation" in out and "mean 0.5 0.25 0.75" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tiny_resnext.ts", "tiny_resnext_state.json", "tiny_resnext_state.pt"]
    assert read_normalization(tmp_path / "out" / "tiny_resnext_state.pt") == Normalization(mean, std)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(tmp_path / "out" / "tiny_resnext.ts"))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # in [0, 1]
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained.eval()(normalised), atol=1e-5, rtol=0)


def test_cli_refuses_a_mean_the_weights_were_not_trained_with(tmp_path, capsys):
    save_state_dict(build_model("tiny_resnet"), tmp_path / "w.pt", Normalization((0.5,) * 3, (0.25,) * 3))
    from cardinal.cli import run
    with pytest.raises(SystemExit) as code:
        run(main, ["--arch", "tiny_resnet", "--weights", str(tmp_path / "w.pt"), "--mean", "0.4", "0.5", "0.5",
                   "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and len(err.splitlines()) == 1
    assert "differs from the mean" in err and "mean 0.5 0.5 0.5, std 0.25 0.25 0.25" in err
    assert not (tmp_path / "o").exists()


def test_a_state_dict_saved_without_normalisation_drops_a_stale_one(tmp_path):
    model = build_model("tiny_resnet")
    save_state_dict(model, tmp_path / "w.pt", Normalization((0.5,) * 3, (0.25,) * 3))
    save_state_dict(model, tmp_path / "w.pt")
    assert read_normalization(tmp_path / "w.pt") is None


def test_a_full_disk_leaves_the_earlier_export_whole_and_no_folder_it_made(tmp_path, monkeypatch):
    import cardinal.fileio

    old = export_model(build_model("tiny_resnet"), tmp_path / "out", "m", formats=("state_dict", "torchscript"),
                       normalization=Normalization((0.5,) * 3, (0.25,) * 3))
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    real = cardinal.fileio._write_synced

    def full_at_the_scripted_model(path, data):
        if path.name.endswith(".ts"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(cardinal.fileio, "_write_synced", full_at_the_scripted_model)
    for output_dir in (tmp_path / "out", tmp_path / "new" / "out"):
        with pytest.raises(CardinalError, match=r"cannot write .*m\.ts: No space left on device"):
            export_model(build_model("tiny_resnet"), output_dir, "m", formats=("state_dict", "torchscript"),
                         normalization=Normalization((0.4,) * 3, (0.2,) * 3))
    # the new weights and mean/std were written first, yet the old set is what is there, and nothing else
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before
    assert read_normalization(old.state_dict).mean == (0.5,) * 3 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet51"], "invalid choice"),
    (["--arch", "tiny_resnet", "--num-classes", "0"], "positive"),
    (["--arch", "tiny_resnet", "--weights", "/nonexistent/w.pt"], "does not exist"),
    (["--arch", "tiny_resnet", "--weights", "{garbage}"], "cannot read weights"),
    (["--arch", "tiny_resnet", "--weights", "{mismatch}"], "does not match"),
    (["--arch", "tiny_resnet", "--weights", "{folder}"], "is a folder with no model_state.pt"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    mismatch = tmp_path / "mismatch.pt"
    torch.save(build_model("tiny_resnext").state_dict(), mismatch)
    argv = [a.format(garbage=garbage, mismatch=mismatch, folder=tmp_path) for a in argv]
    argv += ["--output-dir", str(tmp_path / "o")]
    from cardinal.cli import run
    with pytest.raises(SystemExit) as code:
        run(main, argv)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", ".."])
def test_a_file_name_that_leaves_the_output_folder_is_refused(tmp_path, capsys, name):
    from cardinal.cli import run

    with pytest.raises(SystemExit) as code:
        run(main, ["--arch", "tiny_resnet", "--output-dir", str(tmp_path / "out"), "--name", name])
    assert code.value.code == 2 and "--name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "outside.ts").exists()


def test_a_folder_given_as_a_weights_file_is_named_as_a_folder(tmp_path):
    from cardinal.cli import CardinalError
    with pytest.raises(CardinalError, match="is a folder, not a weights file.*model_state.pt"):
        load_state_dict_file(tmp_path)


# A fast-recipe run with its own mean/std, exported by the run, reloaded three ways: by plain torch as the
# README shows (the run's exported .ts/.pt2 take images in [0, 1]), and by --eval-only of the exported state.
MEAN, STD = ("0.45", "0.5", "0.55"), ("0.3", "0.2", "0.25")
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, cifar_dir):
    """The run (stopped after its first epoch, then resumed), and its export by ``cardinal.export``."""
    root = tmp_path_factory.mktemp("fast-run")
    (root / "run").mkdir()
    (root / "run" / "eval.json").write_text("{}")  # a stale --eval-only result of other weights
    args = [*TINY, "--recipe", "fast", "--epochs", "2", "--batch-size", "16", "--limit-batches", "12",
            "--data-dir", str(cifar_dir), "--no-download", "--mean", *MEAN, "--std", *STD]
    first = cli("cardinal.train", [*args, "--stop-after", "1", "--output-dir", str(root), "--run-name", "run"])
    assert first.returncode == 0, output_tail(first)
    resumed = cli("cardinal.train", ["--resume", str(root / "run"), "--no-progress"])
    assert resumed.returncode == 0, output_tail(resumed)
    exported = cli("cardinal.export", ["--arch", "tiny_resnet", "--weights", str(root / "run"),
                                       "--output-dir", str(root / "exported"), "--formats", "state_dict"])
    assert exported.returncode == 0, output_tail(exported)
    return root, first.stdout, resumed.stdout


@pytest.mark.slow
def test_a_run_records_how_it_was_started_and_says_how_long_and_where_it_resumes(fast_run):
    root, first, resumed = fast_run
    frame = pd.read_csv(root / "run" / "epochs.csv")
    assert list(frame["epoch"]) == [1, 2] and frame["command"].str.startswith("python -m cardinal.train ").all()
    assert re.search(r"estimated time for 1 epoch: ~\d", first)  # 12 steps: timed after 10
    assert "resuming at epoch 2 of 2" in resumed
    assert not (root / "run" / "eval.json").exists()  # a training run never keeps a stale eval.json
    assert read_normalization(root / "exported" / "tiny_resnet_state.pt") == Normalization(
        tuple(map(float, MEAN)), tuple(map(float, STD)))


@pytest.mark.slow
def test_exported_models_take_images_in_0_1_and_give_the_runs_accuracy_without_cardinal(fast_run, cifar_dir):
    root, _, _ = fast_run
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                 if "torch.export.load" in b)
    block = (block.replace("data/cifar-10-batches-py", str(cifar_dir / "cifar-10-batches-py"))
             .replace("exported/resnet50", str(root / "run" / "model")))  # what the run exported
    check = block + "\nimport sys\nprint(any(m.startswith('cardinal') for m in sys.modules))\n"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", check], capture_output=True, text=True,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    *accuracies, cardinal_imported = done.stdout.strip().splitlines()
    assert cardinal_imported == "False"
    expected = pd.read_csv(root / "run" / "epochs.csv")["test_acc"].iloc[-1]
    assert [line.split(":")[0] for line in accuracies] == ["torchscript", "program"]
    for line in accuracies:
        assert float(line.split("test_acc ")[1].rstrip("%")) == pytest.approx(expected, abs=1e-6), line


@pytest.mark.slow
def test_eval_only_of_the_exported_state_uses_its_own_normalisation(fast_run, cifar_dir):
    root, _, _ = fast_run
    weights = root / "exported" / "tiny_resnet_state.pt"
    done = cli("cardinal.train", [*TINY, "--data-dir", str(cifar_dir), "--no-download", "--eval-only",
                                  "--init-weights", str(weights), "--output-dir", str(root)])
    assert done.returncode == 0, output_tail(done)
    result = json.loads((root / f"eval-exported-{weights.stem}" / "eval.json").read_text())
    assert result["test_acc"] == pytest.approx(pd.read_csv(root / "run" / "epochs.csv")["test_acc"].iloc[-1])
    assert result["weights"] == str(weights.resolve()) and result["mean"] == [float(v) for v in MEAN]
    assert f"eval-exported-{weights.stem}" in done.stdout


def test_eval_only_of_other_weights_never_writes_into_a_training_run(tmp_path, capsys):
    from cardinal import train as train_module
    from cardinal.cli import run
    save_state_dict(build_model("tiny_resnet"), tmp_path / "w.pt", Normalization((0.5,) * 3, (0.25,) * 3))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "epochs.csv").write_text("epoch,test_acc\n1,10.0\n")
    base = [*TINY, "--dataset", "synthetic", "--eval-only", "--init-weights", str(tmp_path / "w.pt"),
            "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as code:
        run(train_module.main, [*base, "--run-name", "run"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and "holds a training run" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as code:
        run(train_module.main, [*base, "--std", "0.2", "0.2", "0.2"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and "differs from the std" in err and len(err.splitlines()) == 1
