import importlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from rich.console import Console

from cardinal import bench, build_model, list_archs
from cardinal.cli import run
from cardinal.reference import torchvision_model

REPO = Path(__file__).resolve().parents[1]


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
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["cardinal", "torchvision", "cardinal"] in lines  # the table's two header lines
    assert ["arch", "setting", "img/s", "img/s", "ratio", "spread", "TFLOP/s"] in lines


def test_bench_bad_output_path_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", "--output", str(blocker / "x.csv")])
    assert code.value.code == 2 and "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--output", "RUN/epochs.csv"], "would replace a run's epochs.csv"),
    (["--output", "RUN/config.json"], "would replace a run's config.json"),
])
def test_bad_values_exit_2_with_one_line_and_leave_runs_alone(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("epochs.csv", "config.json"):
        (run_dir / name).write_text("kept")
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", *[a.replace("RUN", str(run_dir)) for a in args]])
    err = capsys.readouterr().err
    assert code.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert all((run_dir / name).read_text() == "kept" for name in ("epochs.csv", "config.json"))


def test_bench_output_that_is_a_folder_exits_2_before_measuring(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", "--output", str(tmp_path)])
    assert code.value.code == 2 and "is a folder" in capsys.readouterr().err


# Scripted img/s per (precision, implementation), one value per repeat: "no" disagrees by ~26% between
# repeats of cardinal ((130 - 100) / 115), "bf16" stays within 5% for both implementations.
SCRIPTED = {"no": {"cardinal": [100.0, 130.0, 115.0], "torchvision": [100.0, 102.0, 101.0]},
            "bf16": {"cardinal": [200.0, 205.0, 203.0], "torchvision": [198.0, 200.0, 196.0]}}


def run_scripted_bench(tmp_path, monkeypatch, extra=()):
    """bench.main on tiny_resnet with ``measure`` replaced by the scripted values; returns (csv, calls)."""
    remaining = {precision: {name: list(rates) for name, rates in by_impl.items()}
                 for precision, by_impl in SCRIPTED.items()}
    calls = []

    def scripted_measure(model, *, precision, **settings):
        name = "torchvision" if type(model).__module__.startswith("torchvision") else "cardinal"
        calls.append((precision, name))
        return remaining[precision][name].pop(0)
    monkeypatch.setattr(bench, "measure", scripted_measure)
    output = tmp_path / "bench.csv"
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", "--batch-sizes", "8", "--precisions", "no", "bf16",
                         "--memory-formats", "nchw", "--modes", "train", "--repeats", "3", "--output",
                         str(output), *extra])
    assert code.value.code == 0
    return pd.read_csv(output), calls


def test_spread_columns_agree_with_the_repeats(tmp_path, monkeypatch):
    frame, calls = run_scripted_bench(tmp_path, monkeypatch)
    # the order of implementations alternates from one repeat to the next
    assert calls[:6] == [("no", "cardinal"), ("no", "torchvision"), ("no", "torchvision"), ("no", "cardinal"),
                         ("no", "cardinal"), ("no", "torchvision")]
    for row in frame.itertuples():
        for name in bench.IMPLEMENTATIONS:
            repeats = [float(v) for v in str(getattr(row, f"{name}_repeats_img_per_s")).split(";")]
            assert repeats == SCRIPTED[row.precision][name]
            assert getattr(row, f"{name}_img_per_s") == max(repeats)
            assert getattr(row, f"{name}_median_img_per_s") == statistics.median(repeats)
            assert getattr(row, f"{name}_spread_pct") == pytest.approx(
                100 * (max(repeats) - min(repeats)) / statistics.median(repeats))
        assert row.cardinal_vs_torchvision == pytest.approx(row.cardinal_img_per_s / row.torchvision_img_per_s)
        assert row.repeats == 3


@pytest.mark.parametrize("limit, flagged", [(None, {"no"}), ("30", set())])
def test_ratios_whose_repeats_disagree_are_flagged(tmp_path, monkeypatch, capsys, limit, flagged):
    frame, _ = run_scripted_bench(tmp_path, monkeypatch, ["--noise-limit", limit] if limit else [])
    assert frame["noisy"].dtype == bool
    assert set(frame.loc[frame["noisy"], "precision"]) == flagged
    out = capsys.readouterr().out
    ratio_cells = {precision: line for line in out.splitlines() for precision in SCRIPTED
                   if line.split()[:2] == ["tiny_resnet", precision]}
    assert set(ratio_cells) == set(SCRIPTED)
    for precision, line in ratio_cells.items():
        assert ("x*" in line) == (precision in flagged)
    footnote = [line for line in out.splitlines() if line.startswith(bench.NOISY_MARK)]
    if flagged:
        assert len(footnote) == 1 and "10%" in footnote[0] and "--steps" in footnote[0]
    else:
        assert footnote == []


def test_single_repeat_has_no_spread_and_says_so():
    assert math.isnan(bench.spread_pct([123.0]))
    assert bench.spread_pct([90.0, 110.0, 100.0]) == pytest.approx(20.0)
    assert not bench.is_noisy([math.nan, math.nan], 10.0) and bench.is_noisy([math.nan, 10.5], 10.0)
    frame = pd.DataFrame([{"noisy": False, "repeats": 1}])
    assert any("one repeat" in note for note in bench.noise_notes(frame, 10.0))


def test_table_fits_80_columns_without_breaking_numbers():
    rows = []
    for arch, mode, precision, layout, batch in itertools.product(
            ["resnext101_32x8d", "resnet50"], bench.MODES, ["no", "bf16"], list(bench.FORMATS), [128, 1024]):
        row = {"arch": arch, "mode": mode, "precision": precision, "memory_format": layout, "batch": batch,
               "repeats": 3}
        row.update(bench.result_columns({"cardinal": [123456.7, 100000.0, 110000.0],
                                         "torchvision": [12345.6, 12000.0, 12100.0]}, 7.8e9, 10.0))
        rows.append(row)
    frame = pd.DataFrame(rows)
    for subset in (frame, frame[(frame["batch"] == 128) & (frame["memory_format"] == "nchw")]):
        console = Console(width=80, record=True)
        console.print(bench.render(subset, "Throughput on cuda:0"))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80
        for number in ("123456.7", "12345.6", "10.00x*", "21.3%", "962.962"):
            assert text.count(number) == len(subset), number


def test_compiled_table_has_both_torchvision_peers_and_fits_80_columns():
    rows = []
    for arch, mode, precision, layout, batch in itertools.product(
            ["resnext101_32x8d", "resnet50"], bench.MODES, ["no", "bf16"], list(bench.FORMATS), [128, 1024]):
        row = {"arch": arch, "mode": mode, "precision": precision, "memory_format": layout, "batch": batch,
               "repeats": 3, "compiled": "reduce-overhead"}
        row.update(bench.result_columns({"cardinal": [123456.7, 100000.0, 110000.0],
                                         "torchvision": [12345.6, 12000.0, 12100.0],
                                         bench.COMPILED_PEER: [61728.35, 61000.0, 60000.0]}, 7.8e9, 10.0))
        rows.append(row)
    frame = pd.DataFrame(rows)
    assert frame[f"cardinal_vs_{bench.COMPILED_PEER}"].eq(2.0).all()  # best against best
    console = Console(width=80, record=True)
    console.print(bench.render(frame, "Throughput on cuda:0"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "cardinal compiled (reduce-overhead)" in text
    for number in ("123457", "12346", "61728", "10.00x*", "2.00x*", "21.3%"):
        assert text.count(number) == len(frame), number


def test_compiled_bench_measures_three_peers_and_times_their_warm_up(tmp_path, monkeypatch):
    """--compile on the CPU with dynamo's eager backend: the plumbing, not the speed."""
    monkeypatch.setenv("CARDINAL_COMPILE_BACKEND", "eager")
    warmups = []
    real_measure = bench.measure

    def spy(model, **settings):
        warmups.append((type(model).__name__, settings["warmup"]))
        return real_measure(model, **settings)
    monkeypatch.setattr(bench, "measure", spy)
    output = tmp_path / "bench.csv"
    with pytest.raises(SystemExit) as code:
        run(bench.main, ["--archs", "tiny_resnet", "--batch-sizes", "4", "--precisions", "no", "--modes", "train",
                         "--memory-formats", "nchw", "--steps", "1", "--warmup", "1", "--repeats", "1", "--compile",
                         "--output", str(output)])
    assert code.value.code == 0
    row = pd.read_csv(output).iloc[0]
    assert row["compiled"] == "default"
    assert row[f"cardinal_vs_{bench.COMPILED_PEER}"] == pytest.approx(
        row["cardinal_img_per_s"] / row[f"{bench.COMPILED_PEER}_img_per_s"])
    assert all(row[f"{name}_warmup_s"] > 0 for name in (*bench.IMPLEMENTATIONS, bench.COMPILED_PEER))
    # compiled peers (torch.compile wrappers) warm up for at least 3 steps, the eager one for --warmup
    assert sorted(warmups) == [("OptimizedModule", 3), ("OptimizedModule", 3), ("ResNet", 1)]


GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


def gpu_check_env(**extra):
    """The script's environment: this Python's tools first on PATH, no CUDA device, no CPU escape hatch."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GPU_CHECK_", "CARDINAL_GPU"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="", **extra)
    return env


def run_command(command, env=None, timeout=120):
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def test_gpu_check_script_parses_and_is_executable():
    assert os.access(GPU_CHECK, os.X_OK)
    done = run_command(["bash", "-n", GPU_CHECK])
    assert done.returncode == 0, done.stderr


def test_gpu_check_refuses_in_one_line_without_cuda(tmp_path):
    output = tmp_path / "check"
    done = run_command(["bash", GPU_CHECK, output], env=gpu_check_env())
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA device" in done.stderr
    assert not output.exists()


def test_gpu_check_refuses_an_unknown_check(tmp_path):
    done = run_command(["bash", GPU_CHECK, tmp_path / "check"], env=gpu_check_env(GPU_CHECK_ONLY="fp32 warp-speed"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "warp-speed" in done.stderr


@pytest.mark.slow
def test_gpu_check_table_on_the_cpu(tmp_path):
    """A failing check (export without the bf16 run's weights) does not stop the next one, and sets the exit code."""
    output = tmp_path / "check"
    env = gpu_check_env(CARDINAL_GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_ARCH="tiny_resnet", GPU_CHECK_STEPS="2",
                        GPU_CHECK_BATCH="16", GPU_CHECK_ONLY="export fp32 sync-bn")
    done = run_command(["bash", GPU_CHECK, output], env=env, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    table = (output / "summary.txt").read_text()
    rows = {line.split()[0]: line.split() for line in table.splitlines()
            if line.split() and line.split()[0] in {"export", "fp32", "sync-bn"}}
    assert rows["export"][1] == "FAIL"
    assert rows["fp32"][1] == "pass" and (output / "fp32.log").is_file()
    rate = pd.read_csv(output / "runs" / "fp32" / "epochs.csv")["img_per_s"].iloc[-1]
    assert rows["fp32"][3] == f"{rate:.1f}"
    assert rows["sync-bn"][1] == "skip" and "2 CUDA devices" in table


GPU_SPEED = REPO / "benchmarks" / "gpu_speed.sh"


def test_gpu_speed_script_parses_and_refuses_in_one_line_without_cuda(tmp_path):
    assert os.access(GPU_SPEED, os.X_OK)
    assert run_command(["bash", "-n", GPU_SPEED]).returncode == 0
    output = tmp_path / "speed"
    done = run_command(["bash", GPU_SPEED, output], env=gpu_check_env())
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "DRY_RUN=1" in done.stderr
    assert not output.exists()
    done = run_command(["bash", GPU_SPEED, output], env=gpu_check_env(DRY_RUN="1", ONLY="bench warp"))
    assert done.returncode == 2 and "unknown step 'bench'" in done.stderr


GPU_RECIPE = REPO / "benchmarks" / "gpu_recipe.sh"
GPU_SESSION = REPO / "benchmarks" / "gpu_session.sh"


def test_gpu_session_refuses_in_one_line_without_cuda_or_with_a_budget_it_cannot_split(tmp_path):
    output = tmp_path / "session"
    done = run_command(["bash", GPU_SESSION, output], env=gpu_check_env())
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "gpu_session: no CUDA device visible; DRY_RUN=1 exercises this script on a CPU"
    done = run_command(["bash", GPU_SESSION, output], env=gpu_check_env(DRY_RUN="1", BUDGET_S="100", SPEED_S="100"))
    assert done.returncode == 2 and "leaves nothing of BUDGET_S" in done.stderr
    done = run_command(["bash", GPU_SESSION], env=gpu_check_env(DRY_RUN="1"))
    assert done.returncode == 2 and "usage: benchmarks/gpu_session.sh OUTPUT_DIR" in done.stderr
    assert not output.exists()


@pytest.mark.parametrize("script", [GPU_CHECK, GPU_SPEED, GPU_RECIPE, GPU_SESSION,
                                    REPO / "benchmarks" / "preflight.sh"])
def test_gpu_scripts_are_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    done = run_command([shellcheck, "--shell=bash", "--external-sources", "--severity=warning", script])
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("script", [GPU_RECIPE, GPU_SPEED, GPU_CHECK, GPU_SESSION])
def test_gpu_scripts_refuse_a_folder_that_already_holds_results(tmp_path, script):
    assert os.access(script, os.X_OK)
    assert run_command(["bash", "-n", script]).returncode == 0
    (tmp_path / "earlier.log").write_text("")
    env = gpu_check_env(DRY_RUN="1", CARDINAL_GPU_CHECK_ALLOW_CPU="1")
    done = run_command(["bash", script, tmp_path], env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"{script.stem}: {tmp_path} is not empty: pass a new output folder"
    assert [p.name for p in tmp_path.iterdir()] == ["earlier.log"]


def benchmark_script(name: str):
    """A script of benchmarks/ imported as a module (the folder is not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_gpu_speed_report_times_each_epoch_from_its_printed_row():
    report = benchmark_script("gpu_speed_report")
    log = ["100.0 Epoch   loss    acc", "100.5     1 2.3219  10.31 2.2926  14.00  0.0229    17.8",
           "103.5     2 2.2759  14.38 2.2873   9.00  0.0125    20.5", "103.6 exported model.pt2",
           "107.0     3 2.2472  15.62 2.2766  14.00 0.00208    21.5", "107.1 │ Epochs │ 3 │"]
    rows = [{"epoch": str(epoch), "train_time_s": "2.5", "eval_time_s": "0.25"} for epoch in (1, 2, 3)]
    assert report.row_times(log) == {1: 100.5, 2: 103.5, 3: 107.0}
    lines = report.wall_lines(log, rows)
    assert lines[0].startswith("epoch 2: wall 3.00 s, training 2.50 s, evaluation 0.25 s")
    assert "the rest (checkpoint, records) 0.25 s: wall / training 1.200" in lines[0]
    assert lines[-1] == "wall / training, epochs 2+: 1.400 at worst (goal <= 1.15)"  # epoch 3: 3.5 s
    assert report.wall_lines(log[:2], rows) == ["no epoch after the first to time"]


def test_gpu_speed_report_sets_fast_default_batch_against_the_fastest_bench_row(tmp_path):
    report = benchmark_script("gpu_speed_report")
    eager, compiled = tmp_path / "eager.csv", tmp_path / "compiled.csv"
    pd.DataFrame([{"arch": "resnet50", "batch": 288, "compiled": False, "cardinal_img_per_s": 12000.0},
                  {"arch": "resnet50", "batch": 512, "compiled": False, "cardinal_img_per_s": 16000.0},
                  {"arch": "resnext50_32x4d", "batch": 512, "compiled": False, "cardinal_img_per_s": 12000.0}]
                 ).to_csv(eager, index=False)
    pd.DataFrame([{"arch": "resnet50", "batch": 512, "compiled": "reduce-overhead", "cardinal_img_per_s": 24000.0}]
                 ).to_csv(compiled, index=False)
    lines = report.default_batch_lines([str(eager), str(compiled), str(tmp_path / "absent.csv")], 288)
    assert lines == [
        "  resnet50: fast's default batch 288, eager, 12000 img/s = 0.50x the fastest bench row (batch 512, "
        "compiled (reduce-overhead), 24000 img/s; goal >= 0.8x); 0.75x the fastest eager row (batch 512, "
        "16000 img/s)",
        "  resnext50_32x4d: batch 288 was not benched eagerly"]
    lines = report.default_batch_lines([str(eager)], 288)  # the fastest row is eager: one comparison
    assert lines[0] == ("  resnet50: fast's default batch 288, eager, 12000 img/s = 0.75x the fastest bench row "
                        "(batch 512, eager, 16000 img/s; goal >= 0.8x)")


def test_checkpoint_stall_benchmark_saves_both_ways_and_reports_the_ratio(tmp_path, capsys):
    checkpoint_stall = benchmark_script("checkpoint_stall")
    assert checkpoint_stall.main(["--arch", "tiny_resnet", "--ema", "--repeats", "2", "--folder", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "in the loop" in out and "background" in out and "background / in the loop, loop held (best):" in out
    for way in ("loop", "background"):  # each way's last save is complete and swapped in
        state = json.loads((tmp_path / way / "checkpoint" / "trainer.json").read_text())
        assert state["epoch"] == 2 and (tmp_path / way / "checkpoint" / "ema.pt").is_file()


def test_layer_step_probe_steps_one_part_at_a_time_and_restores_the_weights():
    layer_step_probe = benchmark_script("layer_step_probe")
    torch.manual_seed(0)
    model = build_model("tiny_resnet", zero_init_residual=True)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    inputs, targets = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    rows = layer_step_probe.probe(model, inputs, targets, [0.0, 1e-3, 100.0], label_smoothing=0.1)
    baseline = rows["(none)"][0]
    assert set(rows) == {"(none)", *layer_step_probe.PARTS}
    for part in layer_step_probe.PARTS:
        norm, unchanged, small, huge = rows[part]
        assert norm > 0 and unchanged == pytest.approx(baseline, abs=1e-5)
        assert small < baseline  # a small step down the part's own gradient lowers the loss
    assert rows["classifier (fc)"][3] > baseline  # and a huge one on the classifier overshoots
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name])


def test_optimizer_step_benchmark_times_each_optimizer_on_the_real_parameter_groups(capsys):
    optimizer_step = benchmark_script("optimizer_step")
    optimizer_step.main(["--archs", "tiny_resnet", "--steps", "1", "--repeats", "2", "--device", "cpu"])
    rows = [line.split(",") for line in capsys.readouterr().out.splitlines() if line.startswith("optimizer_step,")]
    assert [row[2] for row in rows] == ["sgd", "adamw", "muon"]
    assert all(0 < float(row[3]) <= float(row[4]) for row in rows)  # best <= median, both timed


def test_optimizer_step_benchmark_gives_each_gradient_its_parameters_layout():
    optimizer_step = benchmark_script("optimizer_step")
    model = build_model("tiny_resnet").to(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)).sum().backward()
    from_backward = {name: p.grad.stride() for name, p in model.named_parameters()}
    optimizer_step.set_random_gradients(model, torch.Generator().manual_seed(0))
    assert any(len(stride) == 4 and stride[1] == 1 for stride in from_backward.values())  # channels_last filters
    for name, p in model.named_parameters():  # the fused CUDA steps refuse any other layout
        assert p.grad.stride() == p.stride() == from_backward[name], name
