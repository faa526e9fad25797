"""Which speed-ups a run uses, a training epoch that never waits for the device, and evaluation that keeps
the run's precision and (compiled) one shape."""

import json

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cardinal import build_model
from cardinal.cli import CardinalError
from cardinal.config import Recipe
from cardinal.data import DeviceLoader, Normalize, synthetic_split
from cardinal.engine import evaluate, train_epoch
from cardinal.optim import ScheduledLR, build_optimizer, build_schedule
from cardinal.records import TIMING_COLUMNS
from cardinal.speedups import (
    ACCELERATE_BACKEND_ENV,
    BACKEND_ENV,
    COMPILE_PAYS_FROM_IMAGES,
    compile_kwargs,
    compile_model,
    compile_request,
    compiled_for_eval,
    fused_optimizer,
    resolve_compile,
)
from cardinal.train import build_parser, config_from_args

from conftest import SYNTHETIC, TINY, cli, cli_ok, output_tail, train


@pytest.fixture
def no_compile_env(monkeypatch):
    monkeypatch.delenv(ACCELERATE_BACKEND_ENV, raising=False)
    monkeypatch.delenv(BACKEND_ENV, raising=False)


@pytest.mark.parametrize("requested, device, world, expected", [
    (None, "cuda", 1, "reduce-overhead"),  # by default: CUDA graphs for one launch-bound GPU process
    (None, "cuda", 2, "default"),  # CUDA graphs do not mix with DDP's hooks on BatchNorm
    (None, "cpu", 1, False),  # compiling costs minutes on a CPU and gains little
    (False, "cuda", 1, False),
    ("auto", "cpu", 1, "default"),  # --compile on a CPU
    (True, "cpu", 2, "default"),  # a config.json written before modes were recorded
    ("max-autotune", "cuda", 2, "max-autotune"),  # an explicit mode is kept
])
def test_one_function_decides_whether_and_how_a_run_compiles(no_compile_env, requested, device, world, expected):
    assert resolve_compile(requested, device, world) == expected


def test_by_default_a_cuda_run_compiles_only_when_long_enough_to_pay(no_compile_env):
    assert resolve_compile(None, "cuda", 1, planned_images=COMPILE_PAYS_FROM_IMAGES) == "reduce-overhead"
    assert resolve_compile(None, "cuda", 1, planned_images=10 * 40_000) is False  # 10 epochs of CIFAR
    assert resolve_compile(True, "cuda", 1, planned_images=40_000) == "reduce-overhead"  # --compile wins
    assert resolve_compile(None, "cpu", 1, planned_images=10 ** 9) is False


def test_an_accelerate_config_that_asks_for_dynamo_compiles_by_default(monkeypatch):
    monkeypatch.setenv(ACCELERATE_BACKEND_ENV, "INDUCTOR")
    assert resolve_compile(None, "cpu") == "default"
    assert resolve_compile(False, "cpu") is False  # --no-compile wins
    monkeypatch.setenv(ACCELERATE_BACKEND_ENV, "no")
    assert resolve_compile(None, "cpu") is False


def test_gradient_accumulation_on_cuda_compiles_without_cuda_graphs(no_compile_env):
    # a replay of the captured backward overwrites the gradients of the micro-batch before it
    assert resolve_compile(True, "cuda", 1, grad_accum=2) == "default"
    assert resolve_compile(None, "cuda", 1, planned_images=COMPILE_PAYS_FROM_IMAGES, grad_accum=4) == "default"
    assert resolve_compile(True, "cuda", 1, grad_accum=1) == "reduce-overhead"
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(CardinalError, match=f"compile mode {mode} .*captures CUDA graphs.*--grad-accum 2"):
            resolve_compile(mode, "cuda", 1, grad_accum=2)
        assert resolve_compile(mode, "cpu", 1, grad_accum=2) == mode  # no graphs off CUDA
    assert resolve_compile("max-autotune-no-cudagraphs", "cuda", 1, grad_accum=2) == "max-autotune-no-cudagraphs"


def test_unknown_mode_is_a_user_error():
    with pytest.raises(CardinalError, match="unknown compile mode"):
        resolve_compile("turbo", "cuda")


@pytest.mark.parametrize("argv, requested", [
    ([], None), (["--compile"], "auto"), (["--no-compile"], False), (["--compile-mode", "default"], "default"),
    (["--compile", "--compile-mode", "max-autotune"], "max-autotune"),
    (["--no-compile", "--compile-mode", "default"], False),
])
def test_flags_become_one_request(argv, requested):
    assert config_from_args(build_parser().parse_args(argv)).compile == requested
    flag = {"--compile": True, "--no-compile": False}.get(argv[0] if argv else "")
    mode = argv[argv.index("--compile-mode") + 1] if "--compile-mode" in argv else "auto"
    assert compile_request(flag, mode) == requested


def test_backend_override_drops_the_inductor_mode(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert compile_kwargs("reduce-overhead") == {"backend": "inductor", "mode": "reduce-overhead", "dynamic": False}
    monkeypatch.setenv(BACKEND_ENV, "eager")
    assert compile_kwargs("reduce-overhead") == {"backend": "eager", "dynamic": False}


def test_fused_sgd_on_cuda_only():
    assert fused_optimizer("cuda") is True and fused_optimizer("cpu") is None
    assert fused_optimizer("cuda", "bf16") is True and fused_optimizer("cuda", "fp16") is None  # skips counted
    optimizer = build_optimizer(nn.Linear(2, 2), Recipe(), fused=fused_optimizer("cpu"))
    assert not optimizer.defaults["fused"]


def test_evaluation_reuses_the_training_wrapper_without_ddp(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "eager")
    plain, other = nn.Linear(2, 2), nn.Linear(2, 2)
    wrapper = compile_model(plain, plain, "default")
    assert compiled_for_eval(plain, "default") is wrapper
    assert compiled_for_eval(wrapper, "default") is wrapper
    own = compiled_for_eval(other, "default")  # e.g. the weight average: compiled once, then kept
    assert own is not wrapper and compiled_for_eval(other, "default") is own


def _loader(accelerator, images, batch=8):
    data, labels = synthetic_split(images)
    return DeviceLoader(data, labels, batch, Normalize((0.5,) * 3, (0.25,) * 3, accelerator.device),
                        accelerator.device)


def _count_reads(monkeypatch):
    """Counts Tensor.item calls: each one makes the host wait for the device."""
    reads = []
    real_item = torch.Tensor.item

    def item(tensor):
        reads.append(1)
        return real_item(tensor)
    monkeypatch.setattr(torch.Tensor, "item", item)
    return reads


def _epoch(accelerator, images, **kwargs):
    torch.manual_seed(0)
    model = build_model("tiny_resnet")
    optimizer = build_optimizer(model, Recipe())
    return train_epoch(accelerator, model, _loader(accelerator, images), optimizer,
                       ScheduledLR(optimizer, build_schedule(Recipe(), 1), 0.01), **kwargs)


def test_a_training_epoch_reads_the_device_a_fixed_number_of_times(monkeypatch):
    accelerator = Accelerator(cpu=True)
    reads = _count_reads(monkeypatch)
    short = _epoch(accelerator, 8)
    short_reads = len(reads)
    reads.clear()
    long = _epoch(accelerator, 32)
    assert (short.steps, long.steps) == (1, 4)
    assert len(reads) == short_reads  # none per step: only the end of the epoch reads

    shown = []
    reads.clear()
    _epoch(accelerator, 32, on_step=shown.append, refresh_s=3600.0)
    assert len(shown) == 4 and shown[0] is not None and shown[1:] == [None] * 3  # one refresh: the first step
    assert len(reads) == short_reads + 1
    shown.clear()
    _epoch(accelerator, 32, on_step=shown.append, refresh_s=0.0)
    assert all(loss is not None and loss > 0 for loss in shown) and len(shown) == 4


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_shorter_last_batch_runs_eagerly_instead_of_compiling_a_second_graph(grad_accum):
    from torch._dynamo.utils import counters

    def epoch(odd_batch_model: bool):
        torch.manual_seed(0)
        model = build_model("tiny_resnet")
        compiled = torch.compile(model, backend="eager", dynamic=False)
        optimizer = build_optimizer(model, Recipe())
        torch._dynamo.reset()
        counters.clear()
        stats = train_epoch(Accelerator(cpu=True), compiled, _loader(Accelerator(cpu=True), 20), optimizer,
                            ScheduledLR(optimizer, build_schedule(Recipe(), 1), 0.01), grad_accum=grad_accum,
                            odd_batch_model=model if odd_batch_model else None)  # batches of 8, 8 and 4
        return stats, counters["stats"]["unique_graphs"], model.fc.weight.detach().clone()

    (shared, shared_graphs, shared_fc), (recompiled, recompiled_graphs, recompiled_fc) = epoch(True), epoch(False)
    assert shared_graphs == 1 and recompiled_graphs == 2
    assert shared.loss == pytest.approx(recompiled.loss) and shared.images == 20
    torch.testing.assert_close(shared_fc, recompiled_fc)  # one step ran eagerly: the same update


def _eval_split(count=21):
    images, labels = synthetic_split(count, seed=3)
    return images, labels, Normalize((0.5,) * 3, (0.25,) * 3, torch.device("cpu"), channels_last=True)


def test_compiled_evaluation_pads_the_last_batch_to_keep_one_shape(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "eager")
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model("tiny_resnet").to(memory_format=torch.channels_last)
    images, labels, normalize = _eval_split()
    eager = evaluate(accelerator, model, images, labels, normalize, batch_size=8, flip=True)
    shapes, layouts = [], []

    def record(module, args, out):
        shapes.append(args[0].shape[0])
        layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    model.conv1.register_forward_hook(record)
    compiled = evaluate(accelerator, model, images, labels, normalize, batch_size=8, flip=True,
                        compile_mode="default")
    assert set(shapes) == {8} and all(layouts)  # 21 images: 8, 8, and 5 padded to 8; each twice (flip)
    assert compiled.images == eager.images == 21
    assert compiled.accuracy == eager.accuracy and compiled.flip_accuracy == eager.flip_accuracy
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-5)
    assert model.training  # left as it was found


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_evaluation_runs_in_the_runs_precision_even_for_a_model_accelerate_did_not_prepare(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    average = build_model("tiny_resnet")  # like the weight average: never passed to prepare
    dtypes = []
    average.conv1.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    images, labels, normalize = _eval_split(8)
    evaluate(accelerator, average, images, labels, normalize, batch_size=8)
    assert dtypes == [torch.bfloat16]


@pytest.mark.slow
def test_a_compiled_run_resumes_to_the_csv_of_an_uninterrupted_eager_one_and_exports(tmp_path, monkeypatch):
    """Dynamo's eager backend (CARDINAL_COMPILE_BACKEND) computes what eager mode computes, so a compiled run
    stopped and resumed must give an eager run's records; the checkpoint, the EMA and the export read the same."""
    monkeypatch.setenv(BACKEND_ENV, "eager")
    args = ["--arch", "tiny_resnet", "--dataset", "synthetic", "--synthetic-train", "256", "--synthetic-test",
            "100", "--batch-size", "64", "--eval-batch-size", "64", "--epochs", "2", "--ema-decay", "0.9",
            "--output-dir", str(tmp_path)]
    cli_ok("cardinal.train", [*args, "--no-export", "--no-compile", "--run-name", "eager", "--no-progress"])
    straight = pd.read_csv(tmp_path / "eager" / "epochs.csv")
    assert (straight["compiled"] == False).all()  # noqa: E712 (a CSV column of booleans)
    cli_ok("cardinal.train", [*args, "--compile", "--stop-after", "1", "--run-name", "compiled", "--no-progress"])
    assert list(pd.read_csv(tmp_path / "compiled" / "epochs.csv")["epoch"]) == [1]
    cli_ok("cardinal.train", ["--resume", str(tmp_path / "compiled"), "--no-progress"])
    resumed = pd.read_csv(tmp_path / "compiled" / "epochs.csv")
    assert (resumed["compiled"] == "default").all()  # the mode that ran, on every row
    assert list(resumed["warm_up"]) == [True, True]  # each invocation compiled anew: neither epoch is steady
    assert list(straight["warm_up"]) == [True, False]
    compared = [c for c in straight.columns if c not in TIMING_COLUMNS + ("run_name", "command", "compiled")]
    pd.testing.assert_frame_equal(resumed[compared], straight[compared], check_exact=False, rtol=1e-5)
    state = torch.load(tmp_path / "compiled" / "model_state.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in state)  # plain keys, as an eager run writes
    model = build_model("tiny_resnet").eval()
    model.load_state_dict(state)
    program = torch.export.load(str(tmp_path / "compiled" / "model.pt2")).module()
    x = torch.rand(2, 3, 32, 32)  # the export takes images in [0, 1] and normalises them with the run's own
    norm = json.loads((tmp_path / "compiled" / "model_state.json").read_text())
    normalised = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(normalised), atol=1e-5, rtol=0)
    assert (tmp_path / "compiled" / "model_ema_state.pt").is_file()


@pytest.mark.parametrize("argv, expected", [
    (["--compile-mode", "default"], "default"),  # the mode alone changes what a resume compiles
    (["--no-compile"], False),
    ([], "reduce-overhead"),  # nothing given: what ran before
])
def test_a_resume_takes_the_compile_flags_given_and_keeps_what_ran_otherwise(tmp_path, argv, expected):
    from cardinal import train as train_module
    from cardinal.config import TrainConfig

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(TrainConfig(arch="tiny_resnet", compile="reduce-overhead").to_json())
    argv = ["--resume", str(run_dir), *argv]
    fresh = train_module.config_from_args(train_module.build_parser().parse_args(argv))
    resumed = train_module.resumed_config(run_dir, fresh, train_module.explicit_flags(argv))
    assert resumed.compile == expected


@pytest.mark.slow
def test_a_compiled_two_process_run_matches_an_eager_one_and_resumes_to_it(tmp_path):
    """Under DDP the compiled wrapper sits around the DDP module in the default mode (no CUDA graphs); with
    dynamo's eager backend it must compute what the eager run computes, across a stop and a resume."""
    env = {BACKEND_ENV: "eager", "OMP_NUM_THREADS": "1"}
    args = [*TINY, *SYNTHETIC, "--epochs", "2", "--recipe", "fast", "--batch-size", "64", "--warmup-epochs", "1",
            "--no-export"]
    eager = train([*args, "--no-compile"], tmp_path, processes=2, run_name="eager", env=env)
    first = train([*args, "--compile", "--stop-after", "1"], tmp_path, processes=2, run_name="compiled", env=env)
    assert first["compiled"].eq("default").all() and first["world_size"].eq(2).all()
    done = cli("cardinal.train", ["--resume", str(tmp_path / "compiled"), "--no-progress"], processes=2, env=env)
    assert done.returncode == 0, output_tail(done)
    resumed = pd.read_csv(tmp_path / "compiled" / "epochs.csv")
    compared = [c for c in eager.columns if c not in TIMING_COLUMNS + ("run_name", "command", "compiled")]
    pd.testing.assert_frame_equal(resumed[compared], eager[compared], check_exact=False, rtol=1e-5)
    assert list(resumed["warm_up"]) == [True, True] and resumed["compiled"].eq("default").all()


def test_a_run_decides_its_compile_mode_knowing_its_micro_batches(tmp_path, monkeypatch):
    import cardinal.threads
    import cardinal.train as train_module

    seen = {}

    class Decided(Exception):
        pass

    def deciding(requested, device_type, world=1, planned_images=None, grad_accum=1):
        seen.update(requested=requested, grad_accum=grad_accum, planned_images=planned_images)
        raise Decided

    monkeypatch.setattr(train_module, "resolve_compile", deciding)
    monkeypatch.setattr(cardinal.threads, "use_cpu_threads", lambda processes: None)  # the suite's threads stay
    args = [*TINY, *SYNTHETIC, "--epochs", "2", "--grad-accum", "2", "--compile"]
    config = config_from_args(build_parser().parse_args(args))
    with pytest.raises(Decided):
        train_module.set_up(config, tmp_path / "run")
    assert seen == {"requested": "auto", "grad_accum": 2, "planned_images": 2 * 600}
