import pandas as pd
import pytest
import torch
import torchvision

from cardinal import build_model, list_archs
from cardinal.cli import run
from cardinal.reference import torchvision_model
from cardinal import bench


@pytest.mark.parametrize("arch", list_archs())
def test_torchvision_reference_is_the_same_network(arch):
    torch.manual_seed(0)
    ours, theirs = build_model(arch).eval(), torchvision_model(arch).eval()
    assert isinstance(theirs, torchvision.models.resnet.ResNet)
    assert all(type(m) is torchvision.models.resnet.Bottleneck for m in theirs.modules()
               if "Bottleneck" in type(m).__name__)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)


def test_bench_writes_its_csv_with_a_torchvision_column(tmp_path, monkeypatch, capsys):
    measured = []
    real_measure = bench.measure

    def spy(model, *args, **kwargs):
        measured.append(type(model).__module__)
        return real_measure(model, *args, **kwargs)
    monkeypatch.setattr(bench, "measure", spy)
    output = tmp_path / "bench.csv"
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", "--batch-sizes", "8", "--precisions", "no", "bf16",
                         "--memory-formats", "nchw", "--steps", "1", "--warmup", "1", "--output", str(output)])
    assert code.value == 0 or code.value.code == 0
    frame = pd.read_csv(output)
    assert len(frame) == 2 * 2  # precisions x modes
    assert (frame[["cardinal_img_per_s", "torchvision_img_per_s", "cardinal_tflop_per_s"]] > 0).all().all()
    assert set(frame["mode"]) == {"train", "infer"} and set(frame["precision"]) == {"no", "bf16"}
    assert measured.count("torchvision.models.resnet") == 8 and measured.count("cardinal.models") == 8
    assert "torchvision img/s" in capsys.readouterr().out


def test_bench_bad_output_path_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", "--output", str(blocker / "x.csv")])
    assert code.value.code == 2 and "cannot write" in capsys.readouterr().err


def test_bench_output_that_is_a_folder_exits_2_before_measuring(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", "--output", str(tmp_path)])
    assert code.value.code == 2 and "is a folder" in capsys.readouterr().err
