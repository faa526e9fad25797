"""Training-loop throughput, three ways, measured in one run on the current device.

1. reference: the reference study's loop: fp32, NCHW, a DataLoader whose Dataset turns each image into a
   PIL image and applies ToTensor + Normalize, plain SGD step.
2. cardinal: cardinal's own train_epoch (device-resident uint8 data, batched normalisation, accelerate)
   with the chosen precision and memory format.
3. bare: forward/backward/step of the same prepared model on one resident tensor: the ceiling for (2).

Reported: steady-state img/s of each (warm-up steps excluded; cardinal and bare alternate --repeats times
and the best of each counts, since both are limited by the same model and shared-machine noise only ever
slows a loop down), cardinal / reference and cardinal / bare.

    python benchmarks/loop_speed.py --arch resnet50 --batch-size 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

from cardinal import build_model
from cardinal.config import CIFAR10_MEAN, STUDY_STD, Recipe
from cardinal.data import DeviceLoader, Normalize, load_cifar, synthetic_split
from cardinal.engine import synchronize, train_epoch
from cardinal.optim import build_optimizer, build_scheduler
from cardinal.speedups import fused_optimizer

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-sample"


class PilCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per sample: HWC uint8 -> PIL -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(np.ascontiguousarray(self.images[index]))), self.labels[index]


def steady_rate(stamps: list, batch: int, warmup: int) -> float:
    """img/s between the end of the warm-up steps and the last step."""
    measured = stamps[warmup:]
    return batch * (len(measured) - 1) / (measured[-1] - measured[0])


def reference_loop(arch, images, labels, batch, steps, warmup, device):
    import torchvision.transforms as T

    transform = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, STUDY_STD)])
    loader = torch.utils.data.DataLoader(PilCifar(images, labels, transform), batch_size=batch, shuffle=True,
                                         num_workers=0, drop_last=True)
    torch.manual_seed(0)
    model = build_model(arch).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    stamps = [time.perf_counter()]
    for step, (inputs, targets) in enumerate(loader):
        if step == steps + warmup:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        loss.item()  # the reference loop logged the running loss every step
        synchronize(device)
        stamps.append(time.perf_counter())
    return steady_rate(stamps, batch, warmup)


def prepared_model(accelerator, arch, channels_last):
    torch.manual_seed(0)
    model = build_model(arch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the step cardinal.train takes on this device: fused where it is
    optimizer = build_optimizer(model, Recipe(), fused=fused_optimizer(accelerator.device.type,
                                                                      accelerator.mixed_precision))
    return accelerator.prepare(model, optimizer)


def cardinal_loop(accelerator, arch, images, labels, batch, steps, warmup, channels_last):
    model, optimizer = prepared_model(accelerator, arch, channels_last)
    normalize = Normalize(CIFAR10_MEAN, STUDY_STD, accelerator.device, channels_last)
    loader = DeviceLoader(images, labels, batch, normalize, accelerator.device, seed=0)
    loader.limit = steps + warmup
    scheduler = build_scheduler(optimizer, Recipe(), len(loader))
    stamps = [time.perf_counter()]
    train_epoch(accelerator, model, loader, optimizer, scheduler,  # refresh_s=0: every step waits for the device
                on_step=lambda loss: stamps.append(time.perf_counter()), refresh_s=0.0)
    return steady_rate(stamps, batch, warmup)


def bare_loop(accelerator, arch, batch, steps, warmup, channels_last):
    model, optimizer = prepared_model(accelerator, arch, channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = torch.randn(batch, 3, 32, 32, device=accelerator.device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 10, (batch,), device=accelerator.device)
    model.train()
    stamps = [time.perf_counter()]
    for _ in range(steps + warmup):
        loss = F.cross_entropy(model(inputs).float(), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(accelerator.device)
        stamps.append(time.perf_counter())
    return steady_rate(stamps, batch, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per loop")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the measurement")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of cardinal and bare loops")
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "fp16", "bf16"))
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--data-dir", default=str(SAMPLE), help="CIFAR-10 batches (synthetic if missing)")
    parser.add_argument("--output", default=None, help="CSV file for the results")
    args = parser.parse_args()

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    try:
        images, labels = load_cifar("cifar10", args.data_dir, train=True)
        source = args.data_dir
    except Exception:
        images, labels = synthetic_split(4096)
        source = "synthetic"
    needed = args.batch_size * (args.steps + args.warmup)
    images, labels = images[:needed], labels[:needed]

    reference = reference_loop(args.arch, images, labels, args.batch_size, args.steps, args.warmup, device)
    ours = bare = 0.0
    for _ in range(args.repeats):
        ours = max(ours, cardinal_loop(accelerator, args.arch, images, labels, args.batch_size, args.steps,
                                       args.warmup, args.channels_last))
        bare = max(bare, bare_loop(accelerator, args.arch, args.batch_size, args.steps, args.warmup,
                                   args.channels_last))
    layout = "channels_last" if args.channels_last else "NCHW"
    results = {
        "reference (fp32, NCHW, PIL DataLoader)": reference,
        f"cardinal ({args.mixed_precision}, {layout})": ours,
        "bare step, resident tensor (same precision/format)": bare,
    }
    table = Table(title=f"{args.arch}, batch {args.batch_size}, {args.steps} measured steps (best of "
                        f"{args.repeats} for cardinal/bare), "
                        f"{torch.get_num_threads()} threads, data: {source}")
    table.add_column("loop")
    table.add_column("img/s", justify="right")
    table.add_column("vs reference", justify="right")
    for name, rate in results.items():
        table.add_row(name, f"{rate:.1f}", f"{rate / reference:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"cardinal / reference = {ours / reference:.2f}x (goal >= 3.0x); "
                  f"cardinal / bare = {ours / bare:.3f} (goal >= 0.90)")
    if args.output:
        import pandas as pd

        pd.DataFrame([{"loop": k, "img_per_s": v, "vs_reference": v / reference} for k, v in results.items()]
                     ).to_csv(args.output, index=False)


if __name__ == "__main__":
    main()
