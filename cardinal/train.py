"""Train a registered architecture on CIFAR with Accelerate; one CSV row per epoch.

    accelerate launch -m cardinal.train --arch resnet50 --download
    accelerate launch -m cardinal.train --arch resnext50_32x4d --recipe fast --mixed-precision bf16

Flow: arguments -> TrainConfig -> (data, model) -> Accelerator.prepare -> epochs -> records -> files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import torch

from cardinal.checkpoint import load_checkpoint, save_checkpoint
from cardinal.cli import ArgumentParser, CardinalError, positive_float, positive_int, run
from cardinal.config import AUGMENTATIONS, RECIPE_FIELDS, RECIPES, SCHEDULES, TrainConfig, resolve_recipe
from cardinal.cost import model_cost
from cardinal.data import (DATASET_CHOICES, DeviceLoader, Normalize, load_cifar, num_classes_of,
                           synthetic_split)
from cardinal.engine import NonFiniteLoss, evaluate, peak_memory_mb, reset_peak_memory, train_epoch
from cardinal.fileio import write_text_atomic
from cardinal.models import build_model, list_archs
from cardinal.records import CONFIG_NAME, CSV_NAME, ConsoleReport, RunRecords, epoch_row, read_csv

IMAGE_SIZE = (3, 32, 32)
# Flags that may differ when resuming: they change how the run continues, not what it computes.
RESUMABLE_CHANGES = {"epochs", "save_every", "max_steps", "limit_eval_batches", "progress", "export",
                     "eval_batch_size", "data_dir", "download", "output_dir", "run_name", "stop_after"}


def _recipe_help(knob: str, text: str) -> str:
    values = ", ".join(f"{name}: {getattr(recipe, knob)}" for name, recipe in RECIPES.items())
    return f"{text} (default from --recipe; {values})"


def build_parser(suppress_defaults: bool = False) -> ArgumentParser:
    parser = ArgumentParser(prog="accelerate launch -m cardinal.train", description=__doc__.split("\n")[0])
    what = parser.add_argument_group("what to train")
    what.add_argument("--arch", default="resnet50", choices=list_archs(), metavar="ARCH",
                      help=f"architecture: {', '.join(list_archs())}")
    what.add_argument("--dataset", default="cifar10", choices=DATASET_CHOICES, help="data set")
    what.add_argument("--data-dir", default="data", help="folder holding (or receiving) the CIFAR python batches")
    what.add_argument("--download", action="store_true", help="download and verify the official archive if missing")
    what.add_argument("--synthetic-train", type=positive_int, default=2048, help="synthetic: training images")
    what.add_argument("--synthetic-test", type=positive_int, default=512, help="synthetic: test images")
    what.add_argument("--synthetic-classes", type=positive_int, default=10, help="synthetic: classes")
    what.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    what.add_argument("--init-weights", default=None, help="start from this state_dict file")

    recipe = parser.add_argument_group("recipe (every knob overrides the chosen recipe)")
    recipe.add_argument("--recipe", default="seed", choices=list(RECIPES),
                        help="seed: the reference study exactly; fast: a stronger recipe for short runs")
    knob = lambda flag, **kw: recipe.add_argument(flag, default=argparse.SUPPRESS, **kw)  # noqa: E731
    knob("--epochs", type=positive_int, help=_recipe_help("epochs", "epochs to train"))
    knob("--batch-size", type=positive_int, help=_recipe_help("batch_size", "global batch per optimizer step"))
    knob("--lr", type=positive_float, help=_recipe_help("lr", "learning rate"))
    knob("--lr-scale-batch", type=int, help=_recipe_help("lr_scale_batch", "if > 0, --lr is for this batch and scales linearly"))
    knob("--momentum", type=float, help=_recipe_help("momentum", "SGD momentum"))
    knob("--nesterov", action=argparse.BooleanOptionalAction, help=_recipe_help("nesterov", "Nesterov momentum"))
    knob("--weight-decay", type=float, help=_recipe_help("weight_decay", "weight decay"))
    knob("--no-decay-norm-bias", action=argparse.BooleanOptionalAction,
         help=_recipe_help("no_decay_norm_bias", "exempt norm weights and biases from weight decay"))
    knob("--label-smoothing", type=float, help=_recipe_help("label_smoothing", "label smoothing"))
    knob("--schedule", choices=SCHEDULES, help=_recipe_help("schedule", "LR schedule"))
    knob("--warmup-epochs", type=float, help=_recipe_help("warmup_epochs", "linear warm-up length"))
    knob("--final-lr-fraction", type=float, help=_recipe_help("final_lr_fraction", "LR at the end / peak LR"))
    knob("--augment", choices=AUGMENTATIONS, help=_recipe_help("augment", "training augmentation"))
    knob("--crop-padding", type=int, help=_recipe_help("crop_padding", "random-crop padding in pixels"))
    knob("--mean", type=float, nargs=3, help=_recipe_help("mean", "normalization mean (R G B)"))
    knob("--std", type=float, nargs=3, help=_recipe_help("std", "normalization std (R G B)"))
    knob("--zero-init-residual", action=argparse.BooleanOptionalAction,
         help=_recipe_help("zero_init_residual", "zero the last BN of each block"))
    knob("--grad-clip", type=float, help=_recipe_help("grad_clip", "max gradient norm (0: off)"))

    how = parser.add_argument_group("how to run")
    how.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                     help="autocast precision (default: the accelerate config's, else no)")
    how.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    how.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    how.add_argument("--compile", action="store_true", help="torch.compile the model")
    how.add_argument("--sync-bn", action="store_true", help="batch-norm statistics over all processes")
    how.add_argument("--eval-batch-size", type=positive_int, default=512, help="evaluation batch per process")
    how.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps in all (0: off)")
    how.add_argument("--limit-batches", type=int, default=0, help="training steps per epoch (0: all)")
    how.add_argument("--limit-eval-batches", type=int, default=0, help="evaluation batches per epoch (0: all)")
    how.add_argument("--eval-only", action="store_true",
                     help="evaluate --init-weights (or --resume) and exit; weights from a run folder are "
                          "normalised as in its config.json")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="runs", help="parent folder of run folders")
    out.add_argument("--run-name", default="", help="run folder name (default: <arch>-<recipe>-<dataset>-seed<seed>)")
    out.add_argument("--save-every", type=positive_int, default=1, help="checkpoint every N epochs (and at the end)")
    out.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    out.add_argument("--stop-after", type=int, default=0,
                     help="end this invocation after N epochs; the schedule still spans --epochs (0: off)")
    out.add_argument("--no-export", dest="export", action="store_false", help="skip the final model export")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def explicit_flags(argv: Optional[Sequence[str]]) -> Set[str]:
    """Names of the options given on the command line (as opposed to defaults)."""
    return set(vars(build_parser(suppress_defaults=True).parse_args(argv)))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in RECIPE_FIELDS}
    recipe = resolve_recipe(args.recipe, overrides)
    for name in ("max_steps", "limit_batches", "limit_eval_batches", "stop_after"):
        if getattr(args, name) < 0:
            raise CardinalError(f"--{name.replace('_', '-')} must be >= 0")
    run_name = args.run_name or f"{args.arch}-{args.recipe}-{args.dataset}-seed{args.seed}"
    return TrainConfig(
        arch=args.arch, dataset=args.dataset, recipe_name=args.recipe, recipe=recipe, seed=args.seed,
        data_dir=str(args.data_dir), download=args.download, synthetic_train=args.synthetic_train,
        synthetic_test=args.synthetic_test, synthetic_classes=args.synthetic_classes,
        output_dir=str(args.output_dir), run_name=run_name, mixed_precision=args.mixed_precision,
        grad_accum=args.grad_accum, channels_last=args.channels_last, compile=args.compile,
        sync_bn=args.sync_bn, eval_batch_size=args.eval_batch_size, save_every=args.save_every,
        max_steps=args.max_steps, limit_batches=args.limit_batches,
        limit_eval_batches=args.limit_eval_batches, init_weights=args.init_weights, export=args.export,
        progress=args.progress,
    )


def resumed_config(run_dir: Path, fresh: TrainConfig, explicit: Set[str]) -> TrainConfig:
    """The saved config, with only the harmless explicitly-given flags applied; conflicts are refused."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise CardinalError(f"cannot resume: {path} not found (is {run_dir} a cardinal run folder?)")
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError) as error:
        raise CardinalError(f"cannot resume: {path} is not a valid config ({error})") from None
    fresh_values, saved_values = fresh.to_dict(), saved.to_dict()
    changes: Dict[str, Any] = {}
    for flag in sorted(explicit - {"resume", "eval_only", "recipe"}):
        if flag in RECIPE_FIELDS:
            new, old = fresh_values["recipe"][flag], saved_values["recipe"][flag]
        else:
            new, old = fresh_values.get(flag), saved_values.get(flag)
        if new == old:
            continue
        if flag not in RESUMABLE_CHANGES:
            raise CardinalError(f"cannot resume {run_dir}: it was trained with --{flag.replace('_', '-')} "
                                f"{old}, not {new}; start a new run instead")
        changes[flag] = new
    if "recipe" in explicit and fresh.recipe_name != saved.recipe_name:
        raise CardinalError(f"cannot resume {run_dir}: it was trained with --recipe {saved.recipe_name}, "
                            f"not {fresh.recipe_name}")
    recipe = replace(saved.recipe, epochs=changes.pop("epochs", saved.recipe.epochs))
    changes.pop("output_dir", None), changes.pop("run_name", None)
    return replace(saved, recipe=recipe, **{k: v for k, v in changes.items() if hasattr(saved, k)})


def _training_normalization(weights: Path, recipe):
    """Weights from a cardinal run are evaluated with the normalisation they were trained with."""
    path = weights.parent / CONFIG_NAME
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text())).recipe
    except (OSError, ValueError, TypeError, AttributeError):
        return recipe
    return replace(recipe, mean=saved.mean, std=saved.std)


def prepare_run_dir(run_dir: Path, resuming: bool) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.{os.getpid()}"  # one per process: ranks probe at the same time
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise CardinalError(f"cannot write to output folder {run_dir}: {error.strerror or error}") from None
    if not resuming and (run_dir / CSV_NAME).exists():
        raise CardinalError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it "
                            "or --run-name to start another")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def load_splits(config: TrainConfig, accelerator) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
    if config.dataset == "synthetic":
        return (synthetic_split(config.synthetic_train, config.synthetic_classes, config.seed, train=True),
                synthetic_split(config.synthetic_test, config.synthetic_classes, config.seed, train=False))
    with accelerator.local_main_process_first():  # one process per machine downloads
        train = load_cifar(config.dataset, config.data_dir, train=True,
                           download_missing=config.download and accelerator.is_local_main_process)
    test = load_cifar(config.dataset, config.data_dir, train=False)
    return train, test


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=config.mixed_precision,
                           dynamo_backend="inductor" if config.compile else None)
    except (ValueError, RuntimeError) as error:
        raise CardinalError(f"cannot set up Accelerate: {str(error).strip().splitlines()[0]}") from None


def train(config: TrainConfig, resume_dir: Optional[Path] = None, eval_only: bool = False,
          stop_after: int = 0, command: str = "") -> int:
    import accelerate
    from accelerate.utils import set_seed

    import cardinal
    from cardinal.export import export_model, load_weights
    from cardinal.syncbn import convert_sync_batchnorm

    run_dir = resume_dir or Path(config.output_dir) / config.run_name
    prepare_run_dir(run_dir, resuming=resume_dir is not None or eval_only)
    accelerator = make_accelerator(config)
    main_process = accelerator.is_main_process
    report = ConsoleReport(enabled=main_process, progress=config.progress)
    recipe = config.recipe
    world = accelerator.num_processes
    if recipe.batch_size < world * config.grad_accum:
        raise CardinalError(f"--batch-size {recipe.batch_size} is smaller than processes x --grad-accum "
                            f"({world} x {config.grad_accum})")
    set_seed(config.seed)
    (train_images, train_labels), (test_images, test_labels) = load_splits(config, accelerator)
    num_classes = num_classes_of(config.dataset, config.synthetic_classes)

    model = build_model(config.arch, num_classes=num_classes, zero_init_residual=recipe.zero_init_residual)
    cost = model_cost(model, IMAGE_SIZE)
    if config.init_weights:
        load_weights(model, config.init_weights, f"{config.arch} with {num_classes} classes")
    if config.sync_bn:
        model = convert_sync_batchnorm(model, accelerator.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)

    from cardinal.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    normalize = Normalize(recipe.mean, recipe.std, device, config.channels_last)
    loader = DeviceLoader(train_images, train_labels, recipe.batch_size, normalize, device,
                          accelerator.process_index, world, shuffle=True,
                          augment=recipe.augment == "crop-flip", crop_padding=recipe.crop_padding,
                          seed=config.seed)
    loader.limit = config.limit_batches or None
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    scheduler = build_scheduler(optimizer, recipe, len(loader))
    accelerator.register_for_checkpointing(scheduler)

    start_epoch, global_step, previous = 1, 0, None
    if resume_dir is not None:
        state = load_checkpoint(accelerator, run_dir)
        if (state.get("arch"), state.get("dataset")) != (config.arch, config.dataset):
            raise CardinalError(f"checkpoint in {run_dir} is for {state.get('arch')} on {state.get('dataset')}")
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        if (run_dir / CSV_NAME).exists():
            previous = read_csv(run_dir / CSV_NAME)
            previous = previous[previous["epoch"] <= state["epoch"]]

    if eval_only:
        result = evaluate(accelerator, model, test_images, test_labels, normalize, config.eval_batch_size,
                          config.limit_eval_batches)
        summary = {"test_loss": result.loss, "test_acc": result.accuracy, "test_images": result.images,
                   "world_size": world}
        if main_process:
            write_text_atomic(run_dir / "eval.json", json.dumps(summary, indent=2))
        report.line(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
        _finish(accelerator)
        return 0

    if main_process:
        write_text_atomic(run_dir / CONFIG_NAME, config.to_json())
    run_info = {
        "run_name": run_dir.name, "arch": config.arch, "dataset": config.dataset, "recipe": config.recipe_name,
        "params": cost.params, "gflops": cost.gflops, "image_size": IMAGE_SIZE[-1],
        "global_batch": recipe.batch_size, "world_size": world, "precision": accelerator.mixed_precision,
        "channels_last": config.channels_last, "compiled": config.compile, "device": device_name(device),
        "torch_version": torch.__version__, "accelerate_version": accelerate.__version__,
        "cardinal_version": cardinal.__version__, "seed": config.seed, "command": command,
    }
    records = RunRecords(run_dir, run_info, previous)
    report.line(f"{config.arch}: {cost.params:,} parameters, {cost.gflops:.2f} GFLOPs/image; {world} process(es) "
                f"on {run_info['device']}, precision {run_info['precision']}; {len(loader)} steps/epoch "
                f"of {recipe.batch_size}; records in {run_dir / CSV_NAME}")

    last_saved = start_epoch - 1
    epoch = start_epoch - 1
    for epoch in range(start_epoch, recipe.epochs + 1):
        if stop_after and epoch - start_epoch >= stop_after:
            epoch -= 1
            break
        remaining = config.max_steps - global_step if config.max_steps else None
        if remaining is not None and remaining <= 0:
            epoch -= 1
            break
        loader.set_epoch(epoch)
        reset_peak_memory(device)
        report.start_epoch(epoch, recipe.epochs, min(len(loader), remaining or len(loader)))
        started = time.perf_counter()
        try:
            trained = train_epoch(accelerator, model, loader, optimizer, scheduler, recipe.label_smoothing,
                                  config.grad_accum, recipe.grad_clip, remaining, report.step)
        except NonFiniteLoss as error:
            report.end_epoch({})
            kept = f"the checkpoint of epoch {last_saved}" if last_saved else "no checkpoint (none saved yet)"
            raise CardinalError(f"loss became NaN/inf at epoch {epoch}, {error}; stopped, keeping "
                                f"{run_dir / CSV_NAME} and {kept}; lower --lr or set --grad-clip") from None
        global_step += trained.steps
        tested = evaluate(accelerator, model, test_images, test_labels, normalize, config.eval_batch_size,
                          config.limit_eval_batches)
        row = epoch_row(epoch, trained, tested, time.perf_counter() - started, cost.train_flops,
                        peak_memory_mb(device))
        if main_process:
            records.add(row)
        report.end_epoch(row)
        finished = epoch == recipe.epochs or (config.max_steps and global_step >= config.max_steps) \
            or (stop_after and epoch - start_epoch + 1 >= stop_after)
        if epoch % config.save_every == 0 or finished:
            save_checkpoint(accelerator, run_dir, {"epoch": epoch, "global_step": global_step,
                                                   "arch": config.arch, "dataset": config.dataset})
            last_saved = epoch
        if config.max_steps and global_step >= config.max_steps:
            break

    if config.export and main_process:
        plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        files = export_model(plain, run_dir, "model", input_size=IMAGE_SIZE)
        report.line("exported " + ", ".join(str(p) for p in files.written().values()))
    if main_process:
        report.final(records.frame(), run_dir)
    _finish(accelerator)
    return 0


def _finish(accelerator) -> None:
    """Leave the process group cleanly: a rank exiting with it open can abort the launch."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    explicit = explicit_flags(argv)
    config = config_from_args(args)
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None:
        config = resumed_config(resume_dir, config, explicit)
    if args.eval_only and not (config.init_weights or resume_dir):
        raise CardinalError("--eval-only needs --init-weights FILE or --resume RUN_DIR")
    if args.eval_only and resume_dir is None and not explicit & {"recipe", "mean", "std"}:
        config = replace(config, recipe=_training_normalization(Path(config.init_weights), config.recipe))
    command = "accelerate launch -m cardinal.train " + shlex.join(argv)
    return train(config, resume_dir, args.eval_only, args.stop_after, command)


if __name__ == "__main__":
    run(main)
