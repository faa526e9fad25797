"""The step profiler: operation classes (forward and backward), FLOP sums, the CSV contract, CLI errors."""

import dataclasses
import json
import sys

import pandas as pd
import pytest
import torch
from rich.console import Console
from torch.utils.flop_counter import flop_registry

from cardinal import profile
from cardinal.cli import run
from cardinal.cost import count_forward_flops
from cardinal.models import build_model

EVALUATE_CONV = "autograd::engine::evaluate_function: ConvolutionBackward0"
FAKE_PEAK = profile.Peak(tflop_per_s=1.0, size=0, dtype="float32")


@pytest.fixture(scope="module")
def profiled():
    """Two pairs of steps of each tiny arch (batch 2, fp32) on the CPU."""
    results, _ = profile.profile_archs(["tiny_resnet", "tiny_resnext"], 2, "no", False, steps=2, warmup=0,
                                       device=torch.device("cpu"), peak=FAKE_PEAK)
    return {result.arch: result for result in results}


def calls(result, op_class, name):
    ops = result.ops
    return ops[(ops["op_class"] == op_class) & (ops["name"] == name)]["calls"].sum()


def test_grouped_conv_and_its_backward_land_in_conv_grouped(profiled):
    resnext, resnet = profiled["tiny_resnext"], profiled["tiny_resnet"]
    # tiny_resnext: 4 grouped 3x3 convs, the 3x3 stem, 4 x (two 1x1 + a 1x1 downsample)
    assert calls(resnext, "conv_grouped", "aten::convolution") == 4
    assert calls(resnext, "conv_grouped", EVALUATE_CONV) == 4
    assert calls(resnext, "conv_dense", EVALUATE_CONV) == 1
    assert calls(resnext, "conv_1x1", EVALUATE_CONV) == 12
    assert calls(resnet, "conv_dense", EVALUATE_CONV) == 5
    grouped = resnext.row("conv_grouped")
    assert grouped.time_ms > 0 and grouped.gflop > 0
    assert resnet.row("conv_grouped").time_ms == 0 and resnet.row("conv_grouped").gflop == 0


def test_other_backward_nodes_follow_their_forward_module(profiled):
    result = profiled["tiny_resnext"]
    evaluate = "autograd::engine::evaluate_function: "
    assert calls(result, "norm", evaluate + "NativeBatchNormBackward0") == 17
    assert calls(result, "elementwise", evaluate + "ReluBackward0") == 13
    assert calls(result, "elementwise", evaluate + "AddBackward0") == 4  # the residual adds
    assert calls(result, "linear", evaluate + "AddmmBackward0") == 1
    assert calls(result, "pool", evaluate + "MeanBackward1") == 1
    assert calls(result, "optimizer", "Optimizer.step#SGD.step") == 1
    assert set(result.ops["op_class"]) <= set(profile.OP_CLASSES)


def test_shares_add_up_and_classes_cover_the_step(profiled):
    for result in profiled.values():
        assert result.classes["share"].sum() == pytest.approx(1.0)
        assert result.step_ms_profiled == pytest.approx(result.ops["time_ms"].sum())
        assert len(result.unprofiled_ms) == 2 and result.step_ms_unprofiled == min(result.unprofiled_ms) > 0


@pytest.mark.parametrize("arch", ["tiny_resnet", "tiny_resnext", "resnext50_32x4d"])
def test_class_flops_add_up_to_three_forward_passes(arch):
    model = build_model(arch)
    train = profile.count_class_flops(model, batch=2)
    forward = profile.count_class_flops(model, batch=2, backward=False)
    assert sum(forward.values()) == count_forward_flops(model) * 2
    assert sum(train.values()) == pytest.approx(3 * sum(forward.values()), rel=0.1)
    for op_class in ("conv_1x1", "conv_grouped", "linear"):  # every input of these needs its gradient
        assert train.get(op_class, 0) == 3 * forward.get(op_class, 0)


def test_conv_backward_formula_matches_torch_for_dense_convs():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    args = (torch.randn(2, 16, 6, 6), x, conv.weight, [16], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [True, True, False])
    out = torch.ops.aten.convolution_backward(*args)
    ours = profile.shape_wrapper(profile.conv_backward_flops)(*args, out_val=out)
    theirs = flop_registry[torch.ops.aten.convolution_backward](*args, out_val=out)
    assert ours == theirs == 2 * (2 * 2 * 16 * 8 * 9 * 36)  # input and weight gradients, each one forward


@pytest.mark.parametrize("name, op_class", [
    ("aten::add_", "elementwise"), ("AddBackward0", "elementwise"), ("ThresholdBackward0", "elementwise"),
    ("aten::addmm", "linear"), ("MaxPool2DWithIndicesBackward0", "pool"), ("NllLossBackward0", "other"),
    ("aten::cross_entropy_loss", "other"),
])
def test_operators_outside_modules_are_classed_by_name(name, op_class):
    assert profile.op_name_class(name) == op_class


def test_tables_fit_an_80_column_terminal(profiled):
    renamed = [dataclasses.replace(profiled["tiny_resnet"], arch="resnet50"),
               dataclasses.replace(profiled["tiny_resnext"], arch="resnext50_32x4d")]
    console = Console(width=80)
    tables = [profile.arch_table(result, f"{result.arch}: a long heading, bf16, channels_last, batch 128")
              for result in renamed]
    for table in tables + list(profile.comparison_tables(renamed)):
        assert console.measure(table).maximum <= 80
    lines = profile.takeaways(renamed)
    assert any("resnext50_32x4d spends" in line and "grouped convs" in line for line in lines)
    assert any("trains at" in line and "the img/s of resnet50" in line for line in lines)


def test_csv_contract(profiled, tmp_path):
    frame = profile.csv_frame(list(profiled.values()), FAKE_PEAK, "no", False, 1, "cpu")
    assert {"arch", "op_class", "time_ms", "share", "gflop", "tflop_per_s", "peak_fraction",
            "step_ms_unprofiled"} <= set(frame.columns)
    assert len(frame) == 2 * len(frame["op_class"].unique())  # every class for every arch, zeros included
    for _, rows in frame.groupby("arch"):
        assert rows["share"].sum() == pytest.approx(1.0)
        assert rows["gflop"].sum() == pytest.approx(3 * rows["forward_gflop"].iloc[0], rel=0.1)
        timed = rows[rows["time_ms"] > 0]
        assert timed["tflop_per_s"].to_list() == pytest.approx((timed["gflop"] / timed["time_ms"]).to_list())


def test_classes_above_the_matmul_peak_are_called_out(profiled):
    assert not any("Above the matmul peak" in line for line in profile.takeaways(list(profiled.values())))
    classes = profiled["tiny_resnext"].classes.assign(peak_fraction=lambda frame: frame["tflop_per_s"] / 1e-9)
    slow = dataclasses.replace(profiled["tiny_resnext"], classes=classes)
    lines = profile.takeaways([slow])
    assert any("Above the matmul peak" in line and "tiny_resnext conv_grouped" in line for line in lines)


@pytest.mark.slow
def test_cli_writes_the_csv_plot_and_traces(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    output, image, traces = tmp_path / "profile.csv", tmp_path / "profile.png", tmp_path / "traces"
    with pytest.raises(SystemExit) as code:
        run(profile.main, ["--archs", "tiny_resnet", "tiny_resnext", "--batch-size", "2", "--steps", "1",
                           "--warmup", "0", "--device", "cpu", "--output", str(output), "--plot", str(image),
                           "--trace", str(traces)])
    assert code.value.code == 0
    frame = pd.read_csv(output)
    contract = {"arch", "op_class", "time_ms", "share", "gflop", "tflop_per_s", "peak_fraction",
                "step_ms_unprofiled", "step_ms_profiled", "precision", "channels_last", "batch", "device",
                "peak_tflop_per_s"}
    assert contract <= set(frame.columns)
    for _, rows in frame.groupby("arch"):
        assert rows["share"].sum() == pytest.approx(1.0)
        assert rows["time_ms"].sum() == pytest.approx(rows["step_ms_profiled"].iloc[0], rel=1e-6)
        assert rows["gflop"].sum() == pytest.approx(3 * rows["forward_gflop"].iloc[0], rel=0.1)
        assert (rows["peak_tflop_per_s"] > 0).all() and (rows["step_ms_unprofiled"] > 0).all()
    grouped = frame[frame["op_class"] == "conv_grouped"].set_index("arch")["time_ms"]
    assert grouped["tiny_resnext"] > 0 and grouped["tiny_resnet"] == 0
    assert image.read_bytes()[:4] == b"\x89PNG"
    for arch in ("tiny_resnet", "tiny_resnext"):
        trace = json.loads((traces / f"{arch}.pt.trace.json").read_text())
        assert any(str(event.get("name", "")).startswith("cardinal.op conv_") for event in trace["traceEvents"])
    captured = capsys.readouterr()
    assert "Takeaways" in captured.out and "grouped convs" in captured.out
    wide = [line for line in captured.out.splitlines() if len(line) > 80 and str(tmp_path) not in line]
    assert not wide, wide  # COLUMNS=80: only a line holding a long path may run past it
    assert "USDT" not in captured.err and "gpuGetDeviceCount" not in captured.err


@pytest.mark.parametrize("args, message", [
    (["--archs", "resnet51"], "invalid choice"),
    (["--batch-size", "0"], "positive"),
    (["--warmup", "-1"], "zero or a positive"),
    (["--precision", "fp8"], "invalid choice"),
    (["--device", "nonsense"], "not usable"),
])
def test_bad_values_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as code:
        run(profile.main, ["--archs", "tiny_resnet", *args] if args[0] != "--archs" else args)
    err = capsys.readouterr().err
    assert code.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unwritable_outputs_exit_2_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(profile, "measure_peak", lambda *a, **k: pytest.fail("measured despite a bad path"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    for flag in ("--output", "--plot", "--trace"):
        with pytest.raises(SystemExit) as code:
            run(profile.main, ["--archs", "tiny_resnet", "--device", "cpu", flag, str(blocker / "x")])
        assert code.value.code == 2
        assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        run(profile.main, ["--archs", "tiny_resnet", "--device", "cpu", "--trace", str(blocker)])
    assert code.value.code == 2 and "is a file" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as code:
        run(profile.main, ["--archs", "tiny_resnet", "--device", "cpu", "--output", str(tmp_path / "p.csv"),
                           "--plot", str(tmp_path / "p.png")])
    assert code.value.code == 2 and "pip install 'cardinal[plot]'" in capsys.readouterr().err


def test_the_profilers_status_lines_are_filtered_and_real_messages_kept(capfd):
    import os

    with profile.native_noise_filtered():
        os.write(2, b"USDT:2026-11-30 03:23:11 6083:6083 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"ERROR:2026-11-30 03:23:11 6083:6083 DeviceProperties.cpp:56] gpuGetDeviceCount failed "
                    b"with code 35\n")
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"


def test_profiling_on_the_cpu_prints_nothing_on_stderr(capfd):
    with profile.native_noise_filtered(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        torch.ones(4).add_(1)
    assert capfd.readouterr().err == ""


def test_an_fp32_step_on_a_gpu_is_held_against_a_tf32_peak_as_its_convolutions_run(monkeypatch):
    matmul = torch.backends.cuda.matmul
    earlier, matmul.allow_tf32 = matmul.allow_tf32, False  # a flag object monkeypatch cannot restore
    try:
        _peak_follows_cudnns_tf32(monkeypatch, matmul)
    finally:
        matmul.allow_tf32 = earlier


def _peak_follows_cudnns_tf32(monkeypatch, matmul):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    seen = []

    def timed(device, dtype, repeats, min_seconds):
        seen.append((dtype, matmul.allow_tf32))
        return profile.Peak(100.0, 4096, str(dtype).removeprefix("torch."))

    monkeypatch.setattr(profile, "_time_matmul_peak", timed)
    assert profile.measure_peak(torch.device("cuda"), "no").dtype == "tf32"
    assert profile.measure_peak(torch.device("cuda"), "bf16").dtype == "bfloat16"
    assert profile.measure_peak(torch.device("cpu"), "no").dtype == "float32"
    assert seen == [(torch.float32, True), (torch.bfloat16, False), (torch.float32, False)]
    assert matmul.allow_tf32 is False  # restored
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # strict fp32 convolutions: a strict peak
    assert profile.measure_peak(torch.device("cuda"), "no").dtype == "float32"


def test_the_peak_on_a_cpu_is_a_timed_matmul_in_the_steps_precision():
    peak = profile.measure_peak(torch.device("cpu"), "no", repeats=1, min_seconds=0.001)
    assert peak.dtype == "float32" and peak.size >= 256 and peak.tflop_per_s > 0
