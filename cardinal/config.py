"""Training configuration: named recipes, each knob overridable, resolved into one frozen record.

``seed`` is the reference study's recipe, kept exactly so its numbers can be reproduced. ``fast`` is a
recipe for short budgets: its warm-up and decay are fractions of the run's steps (so a 1-epoch run warms up
and decays too), augmentation, Muon for the convolutions and AdamW for the rest (``cardinal.muon``) with
decoupled weight decay, label smoothing, no weight decay on norms and biases, and a batch and peak LR sized
by the run (``cardinal.budget``: the batch by the training images and epochs, the LR by the optimizer and its
batch) once the training split is known. Its settings were chosen on a validation split (``val_images``),
never on the test split.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Optional, Tuple, Union

from cardinal.cli import CardinalError
from cardinal.models import STEM_INITS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
STUDY_STD = (0.2023, 0.1994, 0.2010)  # the reference study's constants (a widely copied approximation)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the per-channel std of the CIFAR-10 training set
SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTATIONS = ("none", "crop-flip")
OPTIMIZERS = ("sgd", "adamw", "muon")
# Knobs that change meaning with the optimizer, set when a run switches to it (unless given too): AdamW's
# weight decay is decoupled (scaled by its LR, about 1e-3), so SGD's L2 penalty of 5e-4 would do nothing;
# and its per-coordinate step is bounded by the LR, so it needs no clip against a first large gradient
# (it was measured without one; benchmarks/RECIPE_TUNING.md). Muon (cardinal.muon) is scaled to AdamW's
# update size and takes AdamW's knobs.
# SGD's are fast's measured SGD settings: an L2 penalty, and a clip at norm 1 (batch 512 diverges without).
OPTIMIZER_KNOBS: Dict[str, Dict[str, Any]] = {"sgd": {"weight_decay": 5e-4, "grad_clip": 1.0},
                                              "adamw": {"weight_decay": 0.05, "grad_clip": 0.0},
                                              "muon": {"weight_decay": 0.05, "grad_clip": 0.0}}


@dataclass(frozen=True)
class Recipe:
    """Optimisation and data knobs; every one has a command-line flag of the same name."""

    epochs: int = 10
    batch_size: int = 128  # global: summed over processes and accumulation steps
    lr: float = 0.01  # at batch_size, after scaling (see lr_scale_batch)
    lr_scale_batch: int = 0  # if > 0, lr is given for this batch and scaled linearly to batch_size
    optimizer: str = "sgd"  # sgd, adamw or muon (momentum is their beta1; weight decay is decoupled)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = False
    label_smoothing: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0  # used when warmup_fraction is 0
    warmup_fraction: float = 0.0  # if > 0, the warm-up is this fraction of the run's steps
    decay_fraction: float = 1.0  # the decay spans this final fraction of the steps (at most all after warm-up)
    final_lr_fraction: float = 0.0
    augment: str = "none"
    crop_padding: int = 4
    mean: Tuple[float, float, float] = CIFAR10_MEAN
    std: Tuple[float, float, float] = STUDY_STD
    zero_init_residual: bool = False
    stem_init: str = "kaiming"  # kaiming or conv-default (cardinal.models.STEM_INITS)
    grad_clip: float = 0.0
    head_lr_scale: float = 1.0  # the classifier's (fc) LR as a multiple of the run's LR
    val_images: float = 0  # training images held out for validation: a count (>= 1) or a fraction (< 1)
    eval_flip: bool = False  # also evaluate with horizontal-flip test-time augmentation (own columns)
    ema_decay: float = 0.0  # if > 0, also evaluate an EMA of the weights (own columns); 0: none
    sized_by_budget: Tuple[str, ...] = ()  # knobs cardinal.budget sets from the run's size (batch_size, lr)
    budget_images: int = 0  # the training images they were sized for; 0: not sized (yet)

    @property
    def length_free(self) -> bool:
        """Whether no step's LR depends on the run's length, so the run may be lengthened on resume."""
        return self.schedule == "constant" and self.warmup_fraction == 0

    @property
    def epochs_are_runs(self) -> bool:
        """Whether epoch k of a run is itself a k-epoch run: nothing depends on the planned length (neither
        the LR schedule nor a batch and LR the budget rule sized from it), so a long run stands for shorter ones."""
        return self.length_free and not self.sized_by_budget

    def effective_lr(self) -> float:
        return self.lr * self.batch_size / self.lr_scale_batch if self.lr_scale_batch > 0 else self.lr


RECIPES: Dict[str, Recipe] = {
    "seed": Recipe(),
    "fast": Recipe(
        epochs=10,
        batch_size=32,  # stand-ins until cardinal.budget sizes both from the training split (README, Recipes):
        lr=0.02262,  # what it gives the CIFAR-10 sample (4,160 images): Muon's 2.83e-3 at batch 32
        lr_scale_batch=256,
        optimizer="muon",  # beat AdamW on full-size data at 1 and 5 epochs (benchmarks/RECIPE_TUNING.md)
        nesterov=True,  # with --optimizer sgd
        weight_decay=0.05,  # decoupled
        no_decay_norm_bias=True,
        label_smoothing=0.1,
        schedule="onecycle",
        warmup_epochs=0.0,
        warmup_fraction=0.2,
        decay_fraction=1.0,
        final_lr_fraction=0.0,
        augment="crop-flip",
        std=CIFAR10_STD,
        zero_init_residual=True,
        grad_clip=0.0,  # Muon's and AdamW's steps are bounded by the LR; --optimizer sgd brings a clip of 1
        sized_by_budget=("batch_size", "lr"),
    ),
}
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))
WARMUP_KNOBS = ("warmup_epochs", "warmup_fraction")  # two ways to say one thing: the one given wins
# How knobs got their values, not what a run computes: a batch and LR the rule sized train exactly as the
# same ones given by flag, so comparisons of runs (cardinal.summary) leave these out of a run's conditions.
PROVENANCE_FIELDS = ("sized_by_budget", "budget_images")


def saved_recipe(values: Dict[str, Any]) -> Recipe:
    """The Recipe of a saved ``recipe`` object (JSON lists back to tuples, unknown keys left out); its values
    are not validated here."""
    return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in RECIPE_FIELDS})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, saved as ``config.json`` beside its CSV."""

    arch: str = "resnet50"
    dataset: str = "cifar10"
    recipe_name: str = "seed"
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    data_dir: str = "data"
    download: bool = True
    synthetic_train: int = 2048
    synthetic_test: int = 512
    synthetic_classes: int = 10
    output_dir: str = "runs"
    run_name: str = ""
    mixed_precision: Optional[str] = None
    grad_accum: int = 1
    channels_last: bool = False
    compile: Union[bool, str, None] = False  # None: by device (cardinal.speedups); True; or the mode that ran
    sync_bn: bool = False
    eval_batch_size: int = 512
    save_every: int = 1
    max_steps: int = 0
    limit_batches: int = 0
    limit_eval_batches: int = 0
    init_weights: Optional[str] = None
    export: bool = True
    progress: bool = True
    log_with: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        """Rebuild a saved config; anything but the shape ``to_dict`` writes raises ValueError."""
        if not isinstance(data, dict) or not isinstance(data.get("recipe"), dict):
            raise ValueError("expected a JSON object with a 'recipe' object")
        data = dict(data)
        recipe = data.pop("recipe")
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        config = cls(recipe=saved_recipe(recipe), **values)
        try:
            from cardinal.validate import validate_config  # every field, as the command line checks it

            validate_config(config)
        except CardinalError as error:
            raise ValueError(str(error)) from None
        return config


def resolve_recipe(name: str, overrides: Dict[str, Any]) -> Recipe:
    if name not in RECIPES:
        raise CardinalError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    unknown = set(overrides) - set(RECIPE_FIELDS)
    if unknown:
        raise CardinalError(f"unknown recipe knob(s): {', '.join(sorted(unknown))}")
    overrides = dict(overrides)
    switched_to = overrides.get("optimizer", RECIPES[name].optimizer)
    if switched_to != RECIPES[name].optimizer:
        if "lr" not in overrides and "lr" not in RECIPES[name].sized_by_budget:
            raise CardinalError(f"--optimizer {switched_to} on --recipe {name} needs --lr: the recipe's "
                                f"{RECIPES[name].lr:g} is a {RECIPES[name].optimizer} learning rate")
        overrides = {**OPTIMIZER_KNOBS.get(switched_to, {}), **overrides}
    given = [knob for knob in WARMUP_KNOBS if knob in overrides]
    if len(given) == 1:  # e.g. --warmup-epochs 2 on a recipe that sets a warm-up fraction
        other = WARMUP_KNOBS[1 - WARMUP_KNOBS.index(given[0])]
        overrides[other] = 0.0
    recipe = replace(RECIPES[name], **overrides)
    if "sized_by_budget" not in overrides:  # a knob given on the command line is never resized
        recipe = replace(recipe, sized_by_budget=tuple(k for k in recipe.sized_by_budget if k not in overrides))
    validate_recipe(recipe)
    return recipe



def _finite(*values: Any) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def validate_recipe(recipe: Recipe) -> None:
    floats = ("lr", "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "warmup_fraction",
              "decay_fraction", "final_lr_fraction", "grad_clip", "head_lr_scale", "val_images", "ema_decay")
    for name in floats:
        if not _finite(getattr(recipe, name)):
            raise CardinalError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(recipe, name)}")
    if not (_finite(*recipe.mean) and _finite(*recipe.std)):
        raise CardinalError(f"--mean and --std must be finite numbers, got {recipe.mean} and {recipe.std}")
    checks = [
        (recipe.epochs >= 1, f"--epochs must be positive, got {recipe.epochs}"),
        (recipe.batch_size >= 1, f"--batch-size must be positive, got {recipe.batch_size}"),
        (recipe.lr > 0, f"--lr must be positive, got {recipe.lr}"),
        (recipe.momentum >= 0, f"--momentum must be >= 0, got {recipe.momentum}"),
        (recipe.weight_decay >= 0, f"--weight-decay must be >= 0, got {recipe.weight_decay}"),
        (0 <= recipe.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {recipe.label_smoothing}"),
        (recipe.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
        (recipe.augment in AUGMENTATIONS, f"--augment must be one of {', '.join(AUGMENTATIONS)}"),
        (recipe.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (recipe.optimizer == "sgd" or recipe.momentum < 1, f"--momentum is {recipe.optimizer}'s beta1 and must "
                                                             f"be below 1, got {recipe.momentum}"),
        (recipe.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {recipe.warmup_epochs}"),
        (0 <= recipe.warmup_fraction <= 1, f"--warmup-fraction must be in [0, 1], got {recipe.warmup_fraction}"),
        (not (recipe.warmup_fraction and recipe.warmup_epochs),
         "give --warmup-epochs or --warmup-fraction, not both"),
        (0 <= recipe.decay_fraction <= 1, f"--decay-fraction must be in [0, 1], got {recipe.decay_fraction}"),
        (0 <= recipe.final_lr_fraction <= 1, "--final-lr-fraction must be in [0, 1]"),
        (recipe.val_images >= 0 and (recipe.val_images < 1 or float(recipe.val_images).is_integer()),
         f"--val-images must be a count (0, 1, 2, ...) or a fraction below 1, got {recipe.val_images}"),
        (recipe.crop_padding >= 0, f"--crop-padding must be >= 0, got {recipe.crop_padding}"),
        (recipe.stem_init in STEM_INITS, f"--stem-init must be one of {', '.join(STEM_INITS)}"),
        (len(recipe.mean) == 3 and len(recipe.std) == 3 and min(recipe.std) > 0,
         "--mean and --std take three values each, std positive"),
        (recipe.grad_clip >= 0, f"--grad-clip must be >= 0, got {recipe.grad_clip}"),
        (0 < recipe.head_lr_scale <= 1, f"--head-lr-scale must be in (0, 1], got {recipe.head_lr_scale}"),
        (0 <= recipe.ema_decay < 1, f"--ema-decay must be in [0, 1), got {recipe.ema_decay}"),
        (recipe.budget_images >= 0, f"budget_images must be >= 0, got {recipe.budget_images}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CardinalError(message)
