"""The reference study's protocol rebuilt the plain way, apart from cardinal's training stack.

    python -m cardinal.reference_run --data-dir D --epochs 5 --seed 0 --output-dir runs

torchvision's ResNet with the CIFAR stem (``cardinal.reference``), per-sample PIL ``ToTensor`` +
``Normalize`` in a torch ``DataLoader`` (shuffled, last partial batch kept), SGD lr 0.01, momentum 0.9,
weight decay 5e-4 on every parameter, batch 128, constant LR, no augmentation, mean cross-entropy, fp32.
Nothing of cardinal's training path (Accelerate, ``DeviceLoader``, ``Normalize``, ``engine``, ``optim``) is
used; shared are only the safe CIFAR reader (its batches are pickles), the synthetic data set (for tests
and dry runs), the FLOP count and the file helpers.

It writes the same ``epochs.csv`` columns as ``cardinal.train``, with ``recipe`` = ``reference``, and a
``config.json`` with the protocol's knobs, so ``python -m cardinal.summary`` compares it with
``--recipe seed`` runs under the same conditions (fp32, no channels_last, same data and device): the gap
between the two recipes, with its interval, says whether cardinal's seed recipe reproduces the protocol.
"""

from __future__ import annotations

import math
import random
import resource
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cardinal.cli import (
    ArgumentParser,
    CardinalError,
    non_negative_int,
    positive_int,
    run,
    seed_int,
    single_name,
)
from cardinal.config import RECIPES, TrainConfig
from cardinal.records import COLUMNS, CONFIG_NAME, CSV_NAME

RECIPE_NAME = "reference"
PROTOCOL = replace(RECIPES["seed"], epochs=1)  # the knobs, for config.json; the loop below hard-codes none of them
DATASETS = ("cifar10", "cifar100", "synthetic")


class PILImages(Dataset):
    """CIFAR as the protocol reads it: each image a PIL image, transformed one at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        from torchvision import transforms

        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # N, H, W, C as PIL wants
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def load_data(args) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor], int]:
    """(train, test, classes) as uint8 N x 3 x 32 x 32 tensors and int64 labels."""
    from cardinal.data import load_cifar, num_classes_of, synthetic_split

    if args.dataset == "synthetic":
        train = synthetic_split(args.synthetic_train, args.synthetic_classes, args.seed, train=True)
        test = synthetic_split(args.synthetic_test, args.synthetic_classes, args.seed, train=False)
    else:
        train = load_cifar(args.dataset, args.data_dir, train=True)
        test = load_cifar(args.dataset, args.data_dir, train=False)
    return train, test, num_classes_of(args.dataset, args.synthetic_classes)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int,
                generator: Optional[torch.Generator] = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=False,
                      generator=generator, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0)


@dataclass
class EpochResult:
    loss: float
    correct: int
    images: int
    steps: int
    time_s: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    limit_batches: int = 0) -> EpochResult:
    model.train()
    loss_sum, correct, images, steps = 0.0, 0, 0, 0
    synchronize(device)
    start = time.perf_counter()  # wall time of the epoch, data loading included: it is part of the protocol
    for inputs, targets in loader:
        if limit_batches and steps >= limit_batches:
            break
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(targets)
        correct += (outputs.argmax(1) == targets).sum().item()
        images += len(targets)
        steps += 1
    synchronize(device)
    return EpochResult(loss_sum / max(1, images), correct, images, steps, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, limit_batches: int = 0) -> EpochResult:
    model.eval()
    loss_sum, correct, images, steps = 0.0, 0, 0, 0
    synchronize(device)
    start = time.perf_counter()
    for inputs, targets in loader:
        if limit_batches and steps >= limit_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs)
        loss_sum += F.cross_entropy(outputs, targets, reduction="sum").item()
        correct += (outputs.argmax(1) == targets).sum().item()
        images += len(targets)
        steps += 1
    synchronize(device)
    return EpochResult(loss_sum / max(1, images), correct, images, steps, time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def epoch_row(epoch: int, trained: EpochResult, tested: EpochResult, epoch_time_s: float, train_flops: float,
              peak_mb: float, lr: float) -> Dict[str, Any]:
    """The metric columns of records.EPOCH_COLUMNS, with the same meanings."""
    seconds = max(trained.time_s, 1e-9)
    return {
        "epoch": epoch, "train_loss": trained.loss, "train_objective": trained.loss,
        "train_acc": 100.0 * trained.correct / max(1, trained.images), "test_loss": tested.loss,
        "test_acc": 100.0 * tested.correct / max(1, tested.images), "lr": lr, "epoch_time_s": epoch_time_s,
        "train_time_s": trained.time_s, "eval_time_s": tested.time_s, "steps": trained.steps, "skipped_steps": 0,
        "it_per_s": trained.steps / seconds, "img_per_s": trained.images / seconds,
        "train_tflop_per_s": trained.images * train_flops / seconds / 1e12, "peak_mem_mb": peak_mb,
        "warm_up": epoch == 1, "train_images": trained.images, "test_images": tested.images,
    }


def write_rows(run_dir: Path, rows: List[Dict[str, Any]]) -> None:
    """The whole CSV again after each epoch. This runner does not resume, so a failed write (a full disk)
    ends the run; the rows before are kept, for the record."""
    import pandas as pd

    from cardinal.fileio import cannot_write
    from cardinal.records import write_csv

    frame = pd.DataFrame(rows)
    try:
        write_csv(frame[[c for c in COLUMNS if c in frame.columns]], run_dir / CSV_NAME)
    except OSError as error:
        raise CardinalError(f"{cannot_write(run_dir / CSV_NAME, error)}; its earlier rows are kept; this runner "
                            "does not resume: free space, then run again with another --run-name") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.reference_run", description=__doc__.split("\n")[0])
    from cardinal.models import STEM_INITS, list_archs

    parser.add_argument("--arch", default="resnet50", choices=list_archs(), metavar="ARCH",
                        help="architecture")
    parser.add_argument("--dataset", default="cifar10", choices=DATASETS, help="data set")
    parser.add_argument("--data-dir", default="data", help="folder holding the CIFAR python batches (no download)")
    parser.add_argument("--synthetic-train", type=positive_int, default=2048, help="synthetic: training images")
    parser.add_argument("--synthetic-test", type=positive_int, default=512, help="synthetic: test images")
    parser.add_argument("--synthetic-classes", type=positive_int, default=10, help="synthetic: classes")
    parser.add_argument("--epochs", type=positive_int, default=10, help="epochs to train")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation and shuffling")
    parser.add_argument("--init-weights", default=None,
                        help="start from this state_dict file (cardinal's and this model's names match; "
                             "default: torchvision's random initialisation)")
    parser.add_argument("--stem-init", choices=STEM_INITS, default="conv-default",
                        help="the stem convolution's start: conv-default (a fresh nn.Conv2d's, as torchvision's "
                             "model with a CIFAR stem swapped in has; the default) or kaiming (as cardinal's)")
    parser.add_argument("--workers", type=non_negative_int, default=4, help="DataLoader worker processes")
    parser.add_argument("--eval-batch-size", type=positive_int, default=512, help="evaluation batch")
    parser.add_argument("--limit-batches", type=non_negative_int, default=0, help="training steps per epoch (0: all)")
    parser.add_argument("--limit-eval-batches", type=non_negative_int, default=0, metavar="N",
                        help="evaluation batches per epoch (0: all)")
    parser.add_argument("--output-dir", default="runs", help="parent folder of run folders")
    parser.add_argument("--run-name", type=single_name, default="",
                        help="run folder name (default: <arch>-reference-<dataset>-seed<seed>)")
    return parser


def run_config(args, run_name: str) -> TrainConfig:
    """config.json in cardinal's shape: the protocol's knobs and the setup, for the summary's conditions."""
    return TrainConfig(arch=args.arch, dataset=args.dataset, recipe_name=RECIPE_NAME,
                       recipe=replace(PROTOCOL, epochs=args.epochs, stem_init=args.stem_init), seed=args.seed,
                       data_dir=str(args.data_dir), download=False, synthetic_train=args.synthetic_train,
                       synthetic_test=args.synthetic_test, synthetic_classes=args.synthetic_classes,
                       output_dir=str(args.output_dir), run_name=run_name,
                       eval_batch_size=args.eval_batch_size, limit_batches=args.limit_batches,
                       limit_eval_batches=args.limit_eval_batches, init_weights=args.init_weights, export=False,
                       progress=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from cardinal.cost import model_cost
    from cardinal.export import load_weights
    from cardinal.fileio import cannot_write_folder, folders_made_for, write_text_atomic
    from cardinal.reference import torchvision_model
    from cardinal.threads import use_cpu_threads
    from cardinal.train import device_name
    from cardinal.validate import validate_config

    run_name = args.run_name or f"{args.arch}-{RECIPE_NAME}-{args.dataset}-seed{args.seed}"
    validate_config(replace(run_config(args, run_name), recipe_name="seed"))  # train's bounds for the protocol
    run_dir = Path(args.output_dir) / run_name
    if (run_dir / CSV_NAME).exists():
        raise CardinalError(f"{run_dir} already holds a run; remove it or give another --run-name")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        use_cpu_threads(1)  # as cardinal.train does for one process, so both name the device alike
    (train_images, train_labels), (test_images, test_labels), classes = load_data(args)
    generator = seed_everything(args.seed)
    model = torchvision_model(args.arch, num_classes=classes, stem_init=args.stem_init)
    cost = model_cost(model, (3, 32, 32))
    if args.init_weights:
        load_weights(model, args.init_weights, f"{args.arch} with {classes} classes")
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    train_loader = make_loader(PILImages(train_images, train_labels, PROTOCOL.mean, PROTOCOL.std), 128,
                               shuffle=True, workers=args.workers, generator=generator)
    test_loader = make_loader(PILImages(test_images, test_labels, PROTOCOL.mean, PROTOCOL.std), args.eval_batch_size,
                              shuffle=False, workers=args.workers)
    try:
        with folders_made_for(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / CONFIG_NAME, run_config(args, run_name).to_json())
    except OSError as error:
        raise cannot_write_folder(run_dir, error) from None
    import accelerate

    import cardinal

    info = {"run_name": run_name, "arch": args.arch, "dataset": args.dataset, "recipe": RECIPE_NAME,
            "params": cost.params, "gflops": cost.gflops, "image_size": 32, "global_batch": 128, "world_size": 1,
            "precision": "no", "channels_last": False, "compiled": False, "device": device_name(device),
            "torch_version": torch.__version__, "accelerate_version": accelerate.__version__,
            "cardinal_version": cardinal.__version__, "seed": args.seed,
            "command": "python -m cardinal.reference_run " + shlex.join(argv)}
    print(f"{args.arch} ({RECIPE_NAME} protocol): {len(train_labels)} training images, {len(train_loader)} steps "
          f"an epoch of 128 on {info['device']}; records in {run_dir / CSV_NAME}", flush=True)
    rows: List[Dict[str, Any]] = []
    for epoch in range(1, args.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        trained = train_one_epoch(model, train_loader, optimizer, device, args.limit_batches)
        tested = evaluate(model, test_loader, device, args.limit_eval_batches)
        if not math.isfinite(trained.loss) or not math.isfinite(tested.loss):
            raise CardinalError(f"the loss became NaN/inf at epoch {epoch}; {run_dir / CSV_NAME} keeps the epochs "
                                "before")
        row = epoch_row(epoch, trained, tested, time.perf_counter() - started, cost.train_flops,
                        peak_memory_mb(device), optimizer.param_groups[0]["lr"])
        rows.append({**row, **info})
        write_rows(run_dir, rows)
        print(f"epoch {epoch}: train_loss {row['train_loss']:.4f} test_acc {row['test_acc']:.2f} "
              f"img/s {row['img_per_s']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
