"""Train a registered architecture on CIFAR with Accelerate; one CSV row per epoch.

    python -m cardinal.train --arch resnet50                       # one process
    accelerate launch --config_file launch/gpu-bf16.yaml -m cardinal.train --arch resnext50_32x4d --recipe fast

Flow: arguments -> TrainConfig -> (data, model) -> Accelerator.prepare -> epochs -> records -> files.
``train`` reads as its three steps: set up, run the epochs (``StopRule`` alone decides when they end),
finish (export, final table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Set, Tuple

import torch

from cardinal import budget
from cardinal.checkpoint import CHECKPOINT_DIR, load_checkpoint, read_trainer_state, trainer_state_path
from cardinal.checkpoint_writer import CheckpointWriter
from cardinal.cli import (
    ArgumentParser,
    CardinalError,
    finite_float,
    is_main_rank,
    non_negative_int,
    positive_float,
    positive_int,
    run,
    seed_int,
    single_name,
)
from cardinal.config import (
    AUGMENTATIONS,
    OPTIMIZERS,
    RECIPE_FIELDS,
    RECIPES,
    SCHEDULES,
    TrainConfig,
    resolve_recipe,
)
from cardinal.cost import ModelCost, model_cost
from cardinal.data import (
    DATASET_CHOICES,
    DeviceLoader,
    Normalize,
    hold_out,
    load_cifar,
    num_classes_of,
    synthetic_split,
)
from cardinal.engine import (
    NonFiniteLoss,
    evaluate,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
    train_epoch,
)
from cardinal.fileio import cannot_write_folder, folders_made_for, resume_after_mending, write_text_or_raise
from cardinal.models import STEM_INITS, build_model, list_archs
from cardinal.optim import Schedule, ScheduledLR, build_optimizer, build_schedule
from cardinal.records import CONFIG_NAME, CSV_NAME, ConsoleReport, RunRecords, epoch_row
from cardinal.runlock import check_fresh, check_not_symlink, run_lock
from cardinal.speedups import (
    AUTO,
    COMPILE_MODE_CHOICES,
    COMPILE_PAYS_FROM_IMAGES,
    compile_model,
    compile_request,
    fused_optimizer,
    resolve_compile,
    tune_kernels,
)
from cardinal.tracking import TRACKER_CHOICES, TRACKING_DIR, log_epoch, resolve_trackers, start_tracking
from cardinal.validate import (
    IMAGE_SIDE,
    MAX_LR,
    MAX_SYNTHETIC_IMAGES,
    check_restart_loses_nothing,
    check_rows_agree,
    check_trainer_state,
    checked_rows,
    validate_config,
)

IMAGE_SIZE = (3, 32, 32)
EVAL_NAME = "eval.json"  # what --eval-only writes; a training run removes a stale one from its folder
# Flags that may differ when resuming: they change how the run continues, not what it computes.
# --epochs is decided separately (see check_epochs_change).
RESUMABLE_CHANGES = {"save_every", "max_steps", "limit_eval_batches", "progress", "export", "eval_batch_size",
                     "data_dir", "download", "output_dir", "run_name", "stop_after", "log_with", "compile"}


def _recipe_help(knob: str, text: str) -> str:
    values = ", ".join(f"{name}: {_recipe_default(name, recipe, knob)}" for name, recipe in RECIPES.items())
    return f"{text} (default from --recipe; {values})"


def _recipe_default(name: str, recipe: Any, knob: str) -> str:
    if knob in recipe.sized_by_budget:
        return budget.describe_batch() if knob == "batch_size" else budget.describe_lr()
    return _shown(getattr(recipe, knob))


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def count_or_fraction(text: str) -> float:
    """--val-images: a whole number of images, or a fraction of the training split below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a count (0, 1, 2, ...) or a fraction below 1, got {text}")
    return value if 0 < value < 1 else int(value)


def build_parser(suppress_defaults: bool = False) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.train", description=__doc__.split("\n")[0])
    what = parser.add_argument_group("what to train")
    what.add_argument("--arch", default="resnet50", choices=list_archs(), metavar="ARCH",
                      help="architecture")
    what.add_argument("--dataset", default="cifar10", choices=DATASET_CHOICES, help="data set")
    what.add_argument("--data-dir", default="data", help="folder holding (or receiving) the CIFAR python batches")
    what.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                      help="download and md5-verify CIFAR into --data-dir when it is missing (the default); "
                           "--no-download for offline machines")
    what.add_argument("--synthetic-train", type=positive_int, default=2048,
                      help=f"synthetic: training images (at most {MAX_SYNTHETIC_IMAGES})")
    what.add_argument("--synthetic-test", type=positive_int, default=512,
                      help=f"synthetic: test images (at most {MAX_SYNTHETIC_IMAGES})")
    what.add_argument("--synthetic-classes", type=positive_int, default=10, help="synthetic: classes")
    what.add_argument("--seed", type=seed_int, default=0,
                      help="seed of initialisation, shuffling and augmentation (0 to 4294967295)")
    what.add_argument("--init-weights", default=None, help="start from this state_dict file (default: random)")

    recipe = parser.add_argument_group("recipe (every knob overrides the chosen recipe)")
    recipe.add_argument("--recipe", default="seed", choices=list(RECIPES),
                        help="seed: the reference study exactly; fast: a stronger recipe for short runs")
    knob = lambda flag, **kw: recipe.add_argument(flag, default=argparse.SUPPRESS, **kw)  # noqa: E731
    knob("--epochs", type=positive_int, help=_recipe_help("epochs", "epochs to train"))
    knob("--batch-size", type=positive_int, help=_recipe_help("batch_size", "global batch per optimizer step"))
    knob("--lr", type=positive_float, help=_recipe_help("lr", f"learning rate (at most {MAX_LR:g}), for "
                                                          "--lr-scale-batch images where that is > 0 (fast: "
                                                          "per 256)"))
    knob("--lr-scale-batch", type=non_negative_int,
         help=_recipe_help("lr_scale_batch", "if > 0, --lr is for this batch and scales linearly"))
    knob("--optimizer", choices=OPTIMIZERS,
         help=_recipe_help("optimizer", "sgd, adamw, or muon (Muon for the convolutions after the stem, "
                                        "AdamW for the rest, sized like adamw; --momentum is their beta1; "
                                        "--nesterov is SGD's and Muon's). Switching sets, unless given, "
                                        "--weight-decay (adamw, muon 0.05, decoupled; sgd 5e-4) and --grad-clip "
                                        "(adamw, muon 0; sgd 1); fast sizes each one's LR, seed needs --lr"))
    knob("--momentum", type=finite_float, help=_recipe_help("momentum", "SGD momentum (adamw, muon: beta1)"))
    knob("--nesterov", action=argparse.BooleanOptionalAction,
         help=_recipe_help("nesterov", "Nesterov momentum (SGD, and Muon's filters)"))
    knob("--weight-decay", type=finite_float, help=_recipe_help("weight_decay", "weight decay"))
    knob("--decay-norm-bias", dest="no_decay_norm_bias", action="store_false",
         help="apply weight decay to norm weights and biases too (seed recipe: yes)")
    knob("--no-decay-norm-bias", dest="no_decay_norm_bias", action="store_true",
         help="exempt norm weights and biases from weight decay (fast recipe: yes)")
    knob("--label-smoothing", type=finite_float, help=_recipe_help("label_smoothing", "label smoothing"))
    knob("--schedule", choices=SCHEDULES, help=_recipe_help("schedule", "LR schedule after the warm-up"))
    knob("--warmup-epochs", type=finite_float,
         help=_recipe_help("warmup_epochs", "linear warm-up length in epochs (when --warmup-fraction is 0)"))
    knob("--warmup-fraction", type=finite_float,
         help=_recipe_help("warmup_fraction", "linear warm-up length as a fraction of the run's steps "
                                              "(0: use --warmup-epochs; giving one zeroes the other)"))
    knob("--decay-fraction", type=finite_float,
         help=_recipe_help("decay_fraction", "the LR decays over this final fraction of the run's steps and "
                                             "holds its peak before (1: decay right after the warm-up)"))
    knob("--final-lr-fraction", type=finite_float, help=_recipe_help("final_lr_fraction", "LR at the end / peak LR"))
    knob("--augment", choices=AUGMENTATIONS, help=_recipe_help("augment", "training augmentation"))
    knob("--crop-padding", type=non_negative_int,
         help=_recipe_help("crop_padding", f"random-crop padding in pixels (0 to {IMAGE_SIDE})"))
    knob("--mean", type=finite_float, nargs=3, help=_recipe_help("mean", "normalization mean (R G B)"))
    knob("--std", type=positive_float, nargs=3, help=_recipe_help("std", "normalization std (R G B)"))
    knob("--zero-init-residual", action=argparse.BooleanOptionalAction,
         help=_recipe_help("zero_init_residual", "zero the last BN of each block"))
    knob("--stem-init", choices=STEM_INITS,
         help=_recipe_help("stem_init", "the stem convolution's start: kaiming (as every other convolution) or "
                                        "conv-default (a fresh nn.Conv2d's, as in torchvision's model with a "
                                        "CIFAR stem swapped in)"))
    knob("--grad-clip", type=finite_float, help=_recipe_help("grad_clip", "max gradient norm (0: off)"))
    knob("--head-lr-scale", type=finite_float, metavar="F",
         help=_recipe_help("head_lr_scale", "the classifier's (fc) LR as a fraction of the run's LR"))
    knob("--val-images", type=count_or_fraction, metavar="N",
         help=_recipe_help("val_images", "training images held out as a validation split, evaluated every "
                                         "epoch (val_loss, val_acc): a count, or a fraction below 1 (0: none); "
                                         "tune on it, never on the test split"))
    knob("--eval-flip", action=argparse.BooleanOptionalAction,
         help=_recipe_help("eval_flip", "also evaluate with flip test-time augmentation, in columns of its own "
                                        "(test_acc_tta, val_acc_tta); test_acc stays the plain model's"))
    knob("--ema-decay", type=finite_float, metavar="D",
         help=_recipe_help("ema_decay", "if > 0, keep an exponential moving average of the weights (decay D, "
                                        "warmed up over the first steps) and evaluate it in columns of its own "
                                        "(test_acc_ema, val_acc_ema); test_acc stays the trained model's"))

    how = parser.add_argument_group("how to run")
    how.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                     help="autocast precision (default: the accelerate config's, else no)")
    how.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    how.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    how.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the model (default: on CUDA for runs of at least "
                          f"{COMPILE_PAYS_FROM_IMAGES:,} training images (epochs x images), where compiling "
                          "pays; --no-compile to run eagerly)")
    how.add_argument("--compile-mode", choices=COMPILE_MODE_CHOICES, default=AUTO, metavar="MODE",
                     help="torch.compile mode; auto (the default): reduce-overhead (CUDA graphs) for one CUDA "
                          "process with --grad-accum 1, else default (CUDA graphs and --grad-accum above 1 "
                          "do not mix: reduce-overhead and max-autotune are refused there)")
    how.add_argument("--sync-bn", action="store_true", help="batch-norm statistics over all processes")
    how.add_argument("--eval-batch-size", type=positive_int, default=512, help="evaluation batch per process")
    how.add_argument("--max-steps", type=non_negative_int, default=0,
                     help="stop after this many optimizer steps in all (0: off)")
    how.add_argument("--limit-batches", type=non_negative_int, default=0, help="training steps per epoch (0: all)")
    how.add_argument("--limit-eval-batches", type=non_negative_int, default=0,
                     help="evaluation batches per epoch (0: all)")
    how.add_argument("--eval-only", action="store_true",
                     help="evaluate --init-weights (or --resume) and exit, normalised as the weights were "
                          "trained (their <stem>.json or their run folder's config.json); the result goes to "
                          "OUTPUT_DIR/eval-<folder>-<file>/eval.json (or --run-name), or the --resume folder")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="runs", help="parent folder of run folders")
    out.add_argument("--run-name", type=single_name, default="",
                     help="run folder name (default: <arch>-<recipe>-<dataset>-seed<seed>)")
    out.add_argument("--save-every", type=positive_int, default=1, help="checkpoint every N epochs (and at the end)")
    out.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    out.add_argument("--stop-after", type=non_negative_int, default=0,
                     help="end this invocation after N epochs; the schedule still spans --epochs (0: off)")
    out.add_argument("--log-with", nargs="+", choices=TRACKER_CHOICES, default=[], metavar="TRACKER",
                     help="also log to experiment trackers; none by default")
    out.add_argument("--no-export", dest="export", action="store_false", help="skip the final model export")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def explicit_flags(argv: Optional[Sequence[str]]) -> Set[str]:
    """Names of the config fields given on the command line (as opposed to defaults)."""
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    if "compile_mode" in given:  # --compile-mode alone also sets the config's compile field
        given.add("compile")
    return given


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in RECIPE_FIELDS}
    recipe = resolve_recipe(args.recipe, overrides)
    run_name = args.run_name or f"{args.arch}-{args.recipe}-{args.dataset}-seed{args.seed}"
    return TrainConfig(
        arch=args.arch, dataset=args.dataset, recipe_name=args.recipe, recipe=recipe, seed=args.seed,
        data_dir=str(args.data_dir), download=args.download, synthetic_train=args.synthetic_train,
        synthetic_test=args.synthetic_test, synthetic_classes=args.synthetic_classes,
        output_dir=str(args.output_dir), run_name=run_name, mixed_precision=args.mixed_precision,
        grad_accum=args.grad_accum, channels_last=args.channels_last,
        compile=compile_request(args.compile, args.compile_mode),
        sync_bn=args.sync_bn, eval_batch_size=args.eval_batch_size, save_every=args.save_every,
        max_steps=args.max_steps, limit_batches=args.limit_batches,
        limit_eval_batches=args.limit_eval_batches, init_weights=args.init_weights, export=args.export,
        progress=args.progress, log_with=tuple(args.log_with),
    )


def read_saved_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise CardinalError(f"cannot resume: {path} not found (is {run_dir} a cardinal run folder?)")
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as error:
        raise CardinalError(f"cannot resume: {path} is not a valid config ({error})") from None
    if saved.arch not in list_archs() or saved.dataset not in DATASET_CHOICES:
        raise CardinalError(f"cannot resume: {path} names an unknown arch or dataset "
                            f"({saved.arch!r} on {saved.dataset!r})")
    return saved


def check_epochs_change(run_dir: Path, saved: TrainConfig, epochs: int) -> None:
    """A run may only be lengthened where the LR schedule does not depend on the run's length."""
    if epochs == saved.recipe.epochs:
        return
    length_free = saved.recipe.length_free
    if epochs > saved.recipe.epochs and length_free:
        return
    shape = saved.recipe.schedule + (" (warm-up a fraction of the run)" if saved.recipe.warmup_fraction else "")
    reason = (f"its {shape} LR schedule spans {saved.recipe.epochs} epochs, and changing that "
              "would splice two schedules" if not length_free else "a run cannot be shortened")
    raise CardinalError(f"cannot resume {run_dir} with --epochs {epochs}: {reason}; resume without --epochs "
                        "(use --stop-after N to end an invocation early) or start a new run")


def resumed_config(run_dir: Path, fresh: TrainConfig, explicit: Set[str]) -> TrainConfig:
    """The saved config, with only the harmless explicitly-given flags applied; conflicts are refused."""
    saved = read_saved_config(run_dir)
    fresh_values, saved_values = fresh.to_dict(), saved.to_dict()
    changes: Dict[str, Any] = {}
    for flag in sorted(explicit - {"resume", "eval_only", "recipe"}):
        if flag in RECIPE_FIELDS:
            new, old = fresh_values["recipe"][flag], saved_values["recipe"][flag]
        else:
            new, old = fresh_values.get(flag), saved_values.get(flag)
        if isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
            new, old = tuple(new), tuple(old)
        if new == old:
            continue
        if flag == "epochs":
            check_epochs_change(run_dir, saved, new)
        elif flag not in RESUMABLE_CHANGES:
            raise CardinalError(f"cannot resume {run_dir}: it was trained with --{flag.replace('_', '-')} "
                                f"{_shown(old)}, not {_shown(new)}; start a new run instead")
        changes[flag] = new
    if "recipe" in explicit and fresh.recipe_name != saved.recipe_name:
        raise CardinalError(f"cannot resume {run_dir}: it was trained with --recipe {saved.recipe_name}, "
                            f"not {fresh.recipe_name}")
    recipe = replace(saved.recipe, epochs=changes.pop("epochs", saved.recipe.epochs))
    changes.pop("output_dir", None), changes.pop("run_name", None)
    return replace(saved, recipe=recipe, **{k: v for k, v in changes.items() if hasattr(saved, k)})


def _training_normalization(weights: Path, recipe, explicit: Set[str] = frozenset()):
    """Weights are evaluated with the normalisation they were trained with (their own <stem>.json, else
    their run folder's config.json); an explicit --mean/--std that differs is refused. Only a file that
    carries none (saved by hand) takes the recipe's or the flags', and says so."""
    from cardinal.export import read_normalization

    own = read_normalization(weights)
    if own is None:
        if is_main_rank() and weights.is_file():  # a missing file is an error later
            source = "--mean/--std" if explicit & {"mean", "std"} else "the recipe's"
            print(f"{weights} carries no normalisation: evaluating with {source} mean {_shown(tuple(recipe.mean))}, "
                  f"std {_shown(tuple(recipe.std))}", flush=True)
        return recipe
    for name in sorted(explicit & {"mean", "std"}):
        if tuple(getattr(recipe, name)) != tuple(getattr(own, name)):
            raise CardinalError(f"--{name} {_shown(tuple(getattr(recipe, name)))} differs from the {name} {weights} "
                                f"was trained with ({own.describe()}); leave --mean/--std out")
    return replace(recipe, mean=own.mean, std=own.std)


@contextmanager
def run_folder(run_dir: Path, resuming: bool) -> Iterator[Path]:
    """Create (or check) the run folder and hold its lock for the run's life; a start that fails before
    writing anything leaves no folder (nor the parents it created, such as a first ``runs/``)."""
    check_not_symlink(run_dir)
    with folders_made_for(run_dir, remove_on_failure=is_main_rank()) as created:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test.{os.getpid()}"  # one per process: ranks probe at the same time
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise cannot_write_folder(run_dir, error) from None
        with run_lock(run_dir, remove_on_error=run_dir in created):
            if not resuming and is_main_rank():
                check_fresh(run_dir)
            yield run_dir


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    plural = "thread" if threads == 1 else "threads"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({threads} {plural})"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({threads} {plural})"


Split = Tuple[torch.Tensor, torch.Tensor]


def load_splits(config: TrainConfig, accelerator) -> Tuple[Split, Optional[Split], Split]:
    """(training, validation or None, test): the validation split is held out of the full training split."""
    if config.dataset == "synthetic":
        full = synthetic_split(config.synthetic_train, config.synthetic_classes, config.seed, train=True)
        test = synthetic_split(config.synthetic_test, config.synthetic_classes, config.seed, train=False)
    else:
        with accelerator.local_main_process_first():  # one process per machine downloads
            full = load_cifar(config.dataset, config.data_dir, train=True,
                              download_missing=config.download and accelerator.is_local_main_process)
        test = load_cifar(config.dataset, config.data_dir, train=False)
    train, val = hold_out(*full, config.recipe.val_images, config.seed)
    return train, val, test


def make_accelerator(config: TrainConfig, run_dir: Path, trackers: Sequence[str]):
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=config.mixed_precision,
                           dynamo_backend="no",  # set_up compiles, as cardinal.speedups decides
                           log_with=list(trackers) or None, project_dir=str(run_dir / TRACKING_DIR))
    except (ValueError, RuntimeError) as error:
        raise CardinalError(f"cannot set up Accelerate: {str(error).strip().splitlines()[0]}") from None


@dataclass(frozen=True)
class StopRule:
    """The one place that decides when this invocation stops training."""

    epochs: int  # the run's length, which the schedule spans
    max_steps: int = 0  # optimizer steps in all (0: off)
    stop_after: int = 0  # epochs in this invocation (0: off)
    first_epoch: int = 1

    def steps_left(self, global_step: int) -> Optional[int]:
        return self.max_steps - global_step if self.max_steps else None

    def done(self, epochs_done: int, global_step: int) -> bool:
        return (epochs_done >= self.epochs
                or bool(self.max_steps and global_step >= self.max_steps)
                or bool(self.stop_after and epochs_done - self.first_epoch + 1 >= self.stop_after))


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    schedule_step: int = 0  # optimizer steps applied (fp16 skips excluded): the schedule's position


@dataclass
class Session:
    """Everything a run holds once set up."""

    config: TrainConfig
    run_dir: Path
    accelerator: Any
    report: ConsoleReport
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DeviceLoader
    normalize: Normalize
    test: Split
    val: Optional[Split]  # held out of the training images (--val-images), or None
    cost: ModelCost
    schedule: Schedule
    trackers: Tuple[str, ...]
    checkpoints: CheckpointWriter  # writes each epoch's checkpoint while the next one trains
    average: Optional[torch.nn.Module] = None  # the EMA of the weights (--ema-decay), or None
    step_model: Optional[torch.nn.Module] = None  # the compiled wrapper of model that training steps call

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    def evaluate(self, split: Optional[Split] = None):
        """The test split, or ``split``; every image counted once over the processes."""
        return evaluate(self.accelerator, self.model, *(split or self.test), self.normalize,
                        self.config.eval_batch_size, self.config.limit_eval_batches, flip=self.config.recipe.eval_flip,
                        compile_mode=self.config.compile or None)

    def evaluate_average(self, split: Optional[Split] = None):
        """The EMA's loss and accuracy on the test split or ``split``; None without an EMA or before any update."""
        if self.average is None or int(self.average.n_averaged) == 0:
            return None
        return evaluate(self.accelerator, self.average, *(split or self.test), self.normalize,
                        self.config.eval_batch_size, self.config.limit_eval_batches,
                        compile_mode=self.config.compile or None)


def set_up(config: TrainConfig, run_dir: Path) -> Session:
    from accelerate.utils import set_seed

    from cardinal.ema import build_average
    from cardinal.export import load_weights
    from cardinal.syncbn import convert_sync_batchnorm
    from cardinal.threads import use_cpu_threads

    trackers = tuple(resolve_trackers(config.log_with)) if config.log_with else ()
    accelerator = make_accelerator(config, run_dir, trackers)
    if accelerator.device.type == "cpu":
        use_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or accelerator.num_processes)
    world = accelerator.num_processes
    set_seed(config.seed)
    (train_images, train_labels), val, test = load_splits(config, accelerator)
    config = replace(config, recipe=budget.resolve(config.recipe, len(train_labels)))  # a no-op once sized
    recipe = config.recipe
    if recipe.batch_size < world * config.grad_accum:
        raise CardinalError(f"--batch-size {recipe.batch_size} is smaller than processes x --grad-accum "
                            f"({world} x {config.grad_accum})")
    num_classes = num_classes_of(config.dataset, config.synthetic_classes)

    model = build_model(config.arch, num_classes=num_classes, zero_init_residual=recipe.zero_init_residual,
                        stem_init=recipe.stem_init)
    cost = model_cost(model, IMAGE_SIZE)
    if config.init_weights:
        load_weights(model, config.init_weights, f"{config.arch} with {num_classes} classes")
    if config.sync_bn:
        model = convert_sync_batchnorm(model, accelerator.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    device = accelerator.device
    tune_kernels(device.type)
    optimizer = build_optimizer(model, recipe, fused=fused_optimizer(device.type, accelerator.mixed_precision))
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model)
    average = build_average(plain, recipe.ema_decay) if recipe.ema_decay > 0 else None
    config = replace(config, compile=resolve_compile(config.compile, device.type, world,
                                                     planned_images=recipe.epochs * len(train_labels),
                                                     grad_accum=config.grad_accum))
    step_model = compile_model(model, plain, config.compile) if config.compile else None  # around DDP
    normalize = Normalize(recipe.mean, recipe.std, device, config.channels_last)
    loader = DeviceLoader(train_images, train_labels, recipe.batch_size, normalize, device,
                          accelerator.process_index, world, shuffle=True,
                          augment=recipe.augment == "crop-flip", crop_padding=recipe.crop_padding,
                          seed=config.seed)
    loader.limit = config.limit_batches or None
    if len(loader) == 0:
        raise CardinalError(f"{len(train_labels)} training images make no step of --batch-size {recipe.batch_size} "
                            f"over {world} process(es)")
    report = ConsoleReport(enabled=accelerator.is_main_process, progress=config.progress)
    on_device = lambda split: (split[0].to(device), split[1].to(device)) if split is not None else None  # noqa: E731
    return Session(config, run_dir, accelerator, report, model, optimizer, loader, normalize, on_device(test),
                   on_device(val), cost, build_schedule(recipe, len(loader)), trackers,
                   CheckpointWriter(accelerator, run_dir), average, step_model)


def restore(session: Session, resuming: bool) -> Progress:
    """Where the run stands: a fresh start, or the newest complete checkpoint of the folder."""
    if not resuming:
        return Progress()
    if read_trainer_state(session.run_dir) is None:
        saved = read_saved_config(session.run_dir)  # what the run saved by, whatever --save-every says now
        check_restart_loses_nothing(session.run_dir / CSV_NAME, min(saved.save_every, saved.recipe.epochs))
        session.report.line(f"{session.run_dir} holds no complete checkpoint: starting the run from epoch 1")
        return Progress()
    check_resume_point(session)
    session.accelerator.wait_for_everyone()  # every rank has checked before the main one moves a folder
    state = load_checkpoint(session.accelerator, session.model, session.optimizer, session.run_dir,
                            session.average)
    config = session.config
    if (state.get("arch"), state.get("dataset")) != (config.arch, config.dataset):
        raise CardinalError(f"checkpoint in {session.run_dir} is for {state.get('arch')} on {state.get('dataset')}")
    saved_total = state.get("schedule_total_steps")
    if session.schedule.depends_on_length and saved_total not in (None, session.schedule.total_steps):
        raise CardinalError(f"cannot resume {session.run_dir}: its LR schedule spans {saved_total} steps, this "
                            f"invocation's would span {session.schedule.total_steps}; resume with the run's own "
                            "settings")
    return Progress(int(state["epoch"]), int(state["global_step"]),
                    int(state.get("schedule_step", state["global_step"])))


def check_resume_point(session: Session) -> None:
    """trainer.json and epochs.csv must agree before any checkpoint folder is moved or loaded."""
    path, state = trainer_state_path(session.run_dir), read_trainer_state(session.run_dir)
    check_trainer_state(state, path, session.config, len(session.loader))
    rows = checked_rows(session.run_dir / CSV_NAME, state["epoch"], run_info(session))
    check_rows_agree(state, rows, path)


def run_info(session: Session) -> Dict[str, Any]:
    """The identity every CSV row carries: what ran, where, with which versions."""
    import accelerate

    import cardinal

    config, accelerator = session.config, session.accelerator
    return {
        "run_name": session.run_dir.name, "arch": config.arch, "dataset": config.dataset,
        "recipe": config.recipe_name, "params": session.cost.params, "gflops": session.cost.gflops,
        "image_size": IMAGE_SIZE[-1], "global_batch": config.recipe.batch_size,
        "world_size": accelerator.num_processes, "precision": accelerator.mixed_precision,
        "channels_last": config.channels_last,
        "compiled": config.compile if session.step_model is not None else False,  # False or the mode
        "device": device_name(accelerator.device), "torch_version": torch.__version__,
        "accelerate_version": accelerate.__version__, "cardinal_version": cardinal.__version__,
        "seed": config.seed,
    }


def diverged(epoch: int, what: str, session: Session, progress: Progress) -> CardinalError:
    session.checkpoints.close()  # the checkpoint in flight, if any, is the one kept
    kept = (f"the checkpoint of epoch {progress.epoch}" if read_trainer_state(session.run_dir)
            else "no checkpoint (none saved yet)")
    return CardinalError(f"{what} became NaN/inf at epoch {epoch}; stopped, keeping {session.run_dir / CSV_NAME} "
                         f"and {kept}; start a new run with a lower --lr or with --grad-clip")


def run_epoch(session: Session, epoch: int, progress: Progress, steps_left: Optional[int],
              on_step=None, warm_up: bool = False) -> Dict[str, Any]:
    """Train one epoch and evaluate; returns the epoch's row (``warm_up``: this process's first epoch, whose
    speed holds warm-up and compilation). Non-finite loss or evaluation is an error."""
    config, device = session.config, session.accelerator.device
    session.loader.set_epoch(epoch)
    reset_peak_memory(device)
    session.report.start_epoch(epoch, config.recipe.epochs, min(len(session.loader), steps_left or len(session.loader)))
    lr_schedule = ScheduledLR(session.optimizer, session.schedule, config.recipe.effective_lr(),
                              progress.schedule_step)
    started = time.perf_counter()
    try:
        compiled = session.step_model is not None
        trained = train_epoch(session.accelerator, session.step_model if compiled else session.model,
                              session.loader, session.optimizer, lr_schedule, config.recipe.label_smoothing,
                              config.grad_accum, config.recipe.grad_clip, steps_left, on_step, session.average,
                              odd_batch_model=session.model if compiled else None)
    except NonFiniteLoss:
        session.report.end_epoch({})
        raise diverged(epoch, "the training loss", session, progress) from None
    validated = session.evaluate(session.val) if session.val is not None else None
    tested = session.evaluate()
    val_average = session.evaluate_average(session.val) if session.val is not None else None
    test_average = session.evaluate_average()
    for what, result in (("the validation loss", validated), ("the test loss", tested)):
        if result is not None and not math.isfinite(result.loss):
            session.report.end_epoch({})
            raise diverged(epoch, what, session, progress)
    progress.epoch, progress.global_step = epoch, progress.global_step + trained.steps
    progress.schedule_step = lr_schedule.step
    return epoch_row(epoch, trained, tested, time.perf_counter() - started, session.cost.train_flops,
                     peak_memory_mb(device), validated, test_average, val_average, warm_up=warm_up)


def _first_steps_clock(session: Session, progress: Progress, rule: StopRule):
    """Times the first steps of this invocation and announces the estimated time once (main process)."""
    from cardinal.eta import FirstStepsClock, planned_steps

    epochs = rule.epochs - progress.epoch
    epochs = min(epochs, rule.stop_after) if rule.stop_after else epochs
    clock = FirstStepsClock(planned_steps(epochs, len(session.loader), rule.steps_left(progress.global_step)),
                            epochs, session.report.line, wait=lambda: synchronize(session.accelerator.device))
    clock.done = clock.done or not session.main_process
    return clock


def _step_callback(session: Session, clock) -> Optional[Callable[[Optional[float]], None]]:
    """What the loop calls after each step: the progress bar and, until it has spoken, the time estimate.
    None when neither listens, so an epoch never waits for the device before its end."""
    if clock.done and not session.report.show_progress:
        return None

    def on_step(loss: Optional[float]) -> None:
        session.report.step(loss)
        clock(loss)

    return on_step


def run_epochs(session: Session, progress: Progress, rule: StopRule, records: RunRecords) -> None:
    config = session.config
    clock = _first_steps_clock(session, progress, rule)
    while not rule.done(progress.epoch, progress.global_step):
        epoch = progress.epoch + 1
        row = run_epoch(session, epoch, progress, rule.steps_left(progress.global_step),
                        _step_callback(session, clock), warm_up=epoch == rule.first_epoch)
        session.checkpoints.wait()  # the CSV never runs more than one epoch ahead of the newest checkpoint
        if session.main_process:  # the row first: a kill before the checkpoint only retrains this epoch
            records.add(row)
        if epoch % config.save_every == 0 or rule.done(progress.epoch, progress.global_step):
            session.checkpoints.save(session.model, session.optimizer, {
                "epoch": progress.epoch, "global_step": progress.global_step,
                "schedule_step": progress.schedule_step, "schedule_total_steps": session.schedule.total_steps,
                "arch": config.arch, "dataset": config.dataset}, session.average)
        session.report.end_epoch(row)
        if session.trackers:
            log_epoch(session.accelerator, session.trackers, row, epoch, session.run_dir)
    session.checkpoints.wait()
    session.accelerator.wait_for_everyone()  # every process returns with the last checkpoint on disk


def evaluate_only(session: Session) -> None:
    result = session.evaluate()
    config = session.config
    summary = {"test_loss": result.loss, "test_acc": result.accuracy, "test_images": result.images,
               "world_size": session.accelerator.num_processes, "arch": config.arch, "dataset": config.dataset,
               "weights": str(Path(config.init_weights).resolve()) if config.init_weights else
               str(session.run_dir / CHECKPOINT_DIR), "mean": list(config.recipe.mean), "std": list(config.recipe.std)}
    if result.flip_accuracy is not None:
        summary["test_acc_tta"] = result.flip_accuracy
    averaged = session.evaluate_average()
    if averaged is not None:
        summary["test_acc_ema"] = averaged.accuracy
    if session.main_process:
        write_text_or_raise(session.run_dir / EVAL_NAME, json.dumps(summary, indent=2))
    shown = {k: v for k, v in summary.items() if k not in ("weights", "mean", "std", "arch", "dataset")}
    session.report.line(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    session.report.line(f"wrote {session.run_dir / EVAL_NAME}")


def finish(session: Session, records: RunRecords) -> None:
    from cardinal.export import Normalization, export_model

    if session.config.export and session.main_process:
        plain = session.accelerator.unwrap_model(session.model, keep_fp32_wrapper=False)
        normalization = Normalization(tuple(session.config.recipe.mean), tuple(session.config.recipe.std))
        average = session.average.module if session.average is not None else None
        try:
            files = export_model(plain, session.run_dir, "model", input_size=IMAGE_SIZE,
                                 normalization=normalization, average=average)
        except CardinalError as error:
            raise CardinalError(f"{error}; the run's records and checkpoint are kept: "
                                f"{resume_after_mending(session.run_dir)} (it only exports)") from None
        session.report.line("exported " + ", ".join(str(p) for p in files.written().values()))
    if session.main_process and records.rows:
        session.report.final(records.frame(), session.run_dir)


def write_config(session: Session, config: TrainConfig) -> None:
    if not session.main_process:
        return
    write_text_or_raise(session.run_dir / CONFIG_NAME, config.to_json())


def previous_rows(session: Session, progress: Progress):
    """Records of the epochs the checkpoint covers (checked before it was loaded); later ones, written
    before a kill interrupted their checkpoint, are trained again."""
    if progress.epoch == 0:
        return None
    return checked_rows(session.run_dir / CSV_NAME, progress.epoch, run_info(session))


def header(session: Session, info: Dict[str, Any]) -> str:
    config, cost = session.config, session.cost
    return (f"{config.arch}: {cost.params:,} parameters, {cost.gflops:.2f} GFLOPs/image; "
            f"{info['world_size']} process(es) on {info['device']}, precision {info['precision']}"
            f"{', compiled (' + str(info['compiled']) + ')' if info['compiled'] else ''}; "
            f"{len(session.loader)} steps/epoch of "
            f"{config.recipe.batch_size}"
            + (f"; {len(session.val[1])} training images held out for validation" if session.val else "")
            + f"; records in {session.run_dir / CSV_NAME}")


def train(config: TrainConfig, resume_dir: Optional[Path] = None, eval_only: bool = False,
          stop_after: int = 0, command: str = "") -> int:
    run_dir = resume_dir or Path(config.output_dir) / config.run_name
    with run_folder(run_dir, resuming=resume_dir is not None or eval_only):
        if eval_only and resume_dir is not None and read_trainer_state(run_dir) is None:
            raise CardinalError(f"--eval-only: {run_dir} holds no complete checkpoint to evaluate")
        if eval_only and resume_dir is None and (run_dir / CSV_NAME).exists():
            raise CardinalError(f"--eval-only: {run_dir} holds a training run, and its {EVAL_NAME} would describe "
                                "other weights; pass another --run-name (or --resume it to evaluate its checkpoint)")
        # one evaluation would not win back the time compiling takes
        session = set_up(replace(config, compile=False) if eval_only else config, run_dir)
        clean = False
        try:
            progress = restore(session, resume_dir is not None)
            if eval_only:
                evaluate_only(session)
                clean = True
                return 0
            info = {**run_info(session), "command": command}
            records = RunRecords(run_dir, info, previous_rows(session, progress))  # read before writing
            config = replace(session.config, compile=info["compiled"])  # the recipe as sized in set_up
            write_config(session, config)
            if session.main_process:  # an earlier --eval-only result describes other weights
                (run_dir / EVAL_NAME).unlink(missing_ok=True)
            start_tracking(session.accelerator, session.trackers, run_dir, config.to_dict())
            session.report.line(header(session, info))
            rule = StopRule(config.recipe.epochs, config.max_steps, stop_after, progress.epoch + 1)
            if progress.epoch and rule.done(progress.epoch, progress.global_step):
                session.report.line(f"nothing left to train (checkpoint of epoch {progress.epoch}, step "
                                    f"{progress.global_step})" + ("; exporting" if config.export else ""))
            elif progress.epoch:
                session.report.line(f"resuming at epoch {progress.epoch + 1} of {config.recipe.epochs} "
                                    f"(checkpoint of epoch {progress.epoch}, step {progress.global_step})")
            try:
                run_epochs(session, progress, rule, records)
            except KeyboardInterrupt as interrupt:
                interrupt.hint = f"resume with --resume {run_dir}"  # shown by cardinal.cli.run
                raise
            finish(session, records)
            clean = True
        finally:
            session.checkpoints.close()  # a checkpoint in flight is finished, even after an error
            _close(session.accelerator, clean)
    return 0


_LAST_BARRIER: list = []  # see _meet_before_leaving


def _meet_before_leaving(accelerator) -> None:
    """Wait for every rank. Under gloo, keep the barrier until the interpreter exits: a DistributedDataParallel
    model keeps its process group, and so gloo's worker threads, alive past destroy_process_group; a barrier
    one of those threads lets go of last frees the collectives' tensors before it, which takes the GIL, and
    at interpreter exit that aborts the process ("terminate called without an active exception", seen with
    torch 2.11 on a loaded CPU). Held here, the barrier is freed by the exiting interpreter itself."""
    if torch.distributed.get_backend() != "gloo":
        accelerator.wait_for_everyone()  # NCCL's barrier there names this process's GPU
        return
    work = torch.distributed.barrier(async_op=True)
    work.wait()
    _LAST_BARRIER[:] = [work]  # an earlier run's barrier (one interpreter, several runs) goes now, safely


def _close(accelerator, clean: bool) -> None:
    """End trackers; after a clean run also leave the process group together (a rank exiting with it open
    can abort the launch). After an error other ranks may be mid-step, so nothing waits for them."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if clean and distributed:
        _meet_before_leaving(accelerator)
    try:
        accelerator.end_training()  # also leaves the process group (accelerate >= 1.x)
    except Exception as error:
        if not clean:
            return  # after an error, that error is the one to report, not a tracker's failure to close
        _leave_process_group()  # end_training stopped before it did
        if isinstance(error, OSError):  # a tracker's last write (a full disk)
            raise CardinalError(f"cannot close the trackers: {error.strerror or error}; everything else of "
                                "the run is written") from None
        raise
    if clean:
        _leave_process_group()


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch_command(argv: Sequence[str]) -> str:
    """How this run was started, for the CSV's ``command`` column."""
    from cardinal.threads import launched_by_accelerate

    launcher = "accelerate launch" if launched_by_accelerate() else "python"
    return f"{launcher} -m cardinal.train " + shlex.join(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    explicit = explicit_flags(argv)
    config = config_from_args(args)
    validate_config(config)
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None:
        config = resumed_config(resume_dir, config, explicit)
    if args.eval_only and not (config.init_weights or resume_dir):
        raise CardinalError("--eval-only needs --init-weights FILE or --resume RUN_DIR")
    if args.eval_only and resume_dir is None:
        weights = Path(config.init_weights)
        config = replace(config, recipe=_training_normalization(weights, config.recipe, explicit))
        if "run_name" not in explicit:  # a folder of its own: never a training run's of the same name
            config = replace(config, run_name=f"eval-{weights.resolve().parent.name}-{weights.stem}")
    command = launch_command(argv)
    return train(config, resume_dir, args.eval_only, args.stop_after, command)


if __name__ == "__main__":
    run(main)
