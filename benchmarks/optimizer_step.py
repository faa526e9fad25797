"""What one optimizer step costs beside the training step: each of cardinal's optimizers (``--optimizer``) on
the real model's parameters, timed alone on the current device, in one run.

The training step's own time is not measured here; set the figures against ``cardinal.bench`` (for
resnet50 at batch 512 on one H200, a step takes 22 ms compiled and 32 ms eager). Each optimizer is built as
``cardinal.train`` builds it (fast's groups, the fused step on CUDA where there is one), given the same
random gradients, warmed up, then timed over --steps steps with the device synchronised around them.

    python benchmarks/optimizer_step.py --archs resnet50 resnext50_32x4d
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from cardinal import build_model
from cardinal.config import OPTIMIZERS, RECIPES
from cardinal.engine import synchronize
from cardinal.optim import build_optimizer
from cardinal.speedups import fused_optimizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet50"])
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 untimed ones)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per optimizer; the best is reported")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def set_random_gradients(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Gradients laid out as their parameters (channels_last filters included), as backward makes them: the
    fused CUDA steps refuse a gradient whose layout differs from its parameter's."""
    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(generator=generator).mul_(1e-2)


def time_steps(arch: str, optimizer_name: str, device: torch.device, steps: int, repeats: int) -> list:
    """Milliseconds per step, one figure per repeat."""
    model = build_model(arch).to(device).to(memory_format=torch.channels_last)
    recipe = replace(RECIPES["fast"], optimizer=optimizer_name, lr=1e-3)
    optimizer = build_optimizer(model, recipe, fused=fused_optimizer(device.type, "bf16"))
    set_random_gradients(model, torch.Generator(device=device).manual_seed(0))
    for _ in range(3):
        optimizer.step()
    timings = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        synchronize(device)
        timings.append((time.perf_counter() - start) / steps * 1000)
    return timings


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = Table(title=f"one optimizer step alone, {device.type}, ms")
    for column in ("arch", "optimizer", "best ms", "median ms"):
        table.add_column(column, justify="right" if "ms" in column else "left")
    for arch in args.archs:
        for name in args.optimizers:
            timings = time_steps(arch, name, device, args.steps, args.repeats)
            table.add_row(arch, name, f"{min(timings):.2f}", f"{statistics.median(timings):.2f}")
            print(f"optimizer_step,{arch},{name},{min(timings):.3f},{statistics.median(timings):.3f}", flush=True)
    Console(width=80).print(table)


if __name__ == "__main__":
    main()
