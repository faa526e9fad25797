"""TorchScript and torch.export round trips for every registered architecture."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from cardinal import build_model, list_archs
from cardinal.export import clean_state_dict, export_model, main, script_model

INPUT = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


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
    """Every arch exported once as TorchScript + program, with its eager logits saved beside it."""
    root = tmp_path_factory.mktemp("exported")
    torch.save(INPUT, root / "input.pt")
    for arch in list_archs():
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
    archs = list_archs()
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
    torch.manual_seed(3)
    trained = build_model("tiny_resnext", num_classes=7)
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(SystemExit) as code:
        from cardinal.cli import run
        run(main, ["--arch", "tiny_resnext", "--num-classes", "7", "--weights", str(tmp_path / "w.pt"),
                   "--output-dir", str(tmp_path / "out"), "--formats", "torchscript", "state_dict"])
    assert code.value.code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny_resnext.ts", "tiny_resnext_state.pt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(tmp_path / "out" / "tiny_resnext.ts"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT), trained.eval()(INPUT), atol=1e-5, rtol=0)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet51"], "invalid choice"),
    (["--arch", "tiny_resnet", "--num-classes", "0"], "positive"),
    (["--arch", "tiny_resnet", "--weights", "/nonexistent/w.pt"], "does not exist"),
    (["--arch", "tiny_resnet", "--weights", "{garbage}"], "cannot read weights"),
    (["--arch", "tiny_resnet", "--weights", "{mismatch}"], "does not match"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    mismatch = tmp_path / "mismatch.pt"
    torch.save(build_model("tiny_resnext").state_dict(), mismatch)
    argv = [a.format(garbage=garbage, mismatch=mismatch) for a in argv] + ["--output-dir", str(tmp_path / "o")]
    from cardinal.cli import run
    with pytest.raises(SystemExit) as code:
        run(main, argv)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
