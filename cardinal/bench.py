"""Throughput of training steps and inference, cardinal's stack beside torchvision's, on this device.

    python -m cardinal.bench --archs resnet50 resnext50_32x4d --precisions no bf16 \\
        --memory-formats nchw channels_last --output bench.csv

Each configuration is measured for cardinal's model and for the same architecture built from
torchvision's classes (``cardinal.reference``), in the same process, ``--repeats`` times in alternating
order after warm-up steps; the best of each counts, since noise on a shared machine only slows a run.
Achieved TFLOP/s uses the counted forward FLOPs (x3 for a training step).
"""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from rich.table import Table

from cardinal.cli import ArgumentParser, CardinalError, make_console, positive_int, run
from cardinal.cost import count_forward_flops
from cardinal.engine import synchronize
from cardinal.models import build_model, list_archs
from cardinal.reference import torchvision_model
from cardinal.records import write_csv

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("train", "infer")
IMPLEMENTATIONS = ("cardinal", "torchvision")


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def measure(model: torch.nn.Module, mode: str, batch: int, precision: str, memory_format, device: torch.device,
            steps: int, warmup: int, num_classes: int = 10) -> float:
    """Steady-state images per second of ``steps`` steps after ``warmup`` unmeasured ones."""
    model = model.to(device).to(memory_format=memory_format)
    inputs = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, num_classes, (batch,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        model.eval()

    def step() -> None:
        if mode == "train":
            with _autocast(device, precision):
                loss = F.cross_entropy(model(inputs).float(), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), _autocast(device, precision):
                model(inputs)

    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def run_benchmark(archs: Sequence[str], batch_sizes: Sequence[int], precisions: Sequence[str],
                  memory_formats: Sequence[str], modes: Sequence[str], steps: int, warmup: int,
                  device: torch.device, repeats: int = 2, on_row=None) -> pd.DataFrame:
    rows: List[Dict] = []
    for arch in archs:
        torch.manual_seed(0)
        models = {"cardinal": build_model(arch), "torchvision": torchvision_model(arch)}
        models["torchvision"].load_state_dict(models["cardinal"].state_dict())
        flops = count_forward_flops(models["cardinal"])
        params = sum(p.numel() for p in models["cardinal"].parameters())
        for batch, precision, layout, mode in itertools.product(batch_sizes, precisions, memory_formats, modes):
            rates = {name: 0.0 for name in models}
            for repeat in range(repeats):  # alternate the order; the best of each counts
                for name in (IMPLEMENTATIONS if repeat % 2 == 0 else IMPLEMENTATIONS[::-1]):
                    rate = measure(models[name], mode, batch, precision, FORMATS[layout], device, steps, warmup)
                    rates[name] = max(rates[name], rate)
            flops_per_image = flops * (3 if mode == "train" else 1)
            row = {"arch": arch, "params": params, "gflops": flops / 1e9, "mode": mode, "batch": batch,
                   "precision": precision, "memory_format": layout}
            for name, rate in rates.items():
                row[f"{name}_img_per_s"] = rate
                row[f"{name}_tflop_per_s"] = rate * flops_per_image / 1e12
            row["cardinal_vs_torchvision"] = rates["cardinal"] / rates["torchvision"]
            row["device"] = str(device)
            row["threads"] = torch.get_num_threads()
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return pd.DataFrame(rows)


def render(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in ("arch", "mode", "batch", "precision", "format", "cardinal img/s", "torchvision img/s",
                   "ratio", "cardinal TFLOP/s"):
        table.add_column(column, justify="left" if column in ("arch", "mode", "precision", "format") else "right")
    for row in frame.itertuples():
        table.add_row(row.arch, row.mode, str(row.batch), row.precision, row.memory_format,
                      f"{row.cardinal_img_per_s:.1f}", f"{row.torchvision_img_per_s:.1f}",
                      f"{row.cardinal_vs_torchvision:.2f}x", f"{row.cardinal_tflop_per_s:.3f}")
    return table


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "resnext50_32x4d"], choices=list_archs(),
                        metavar="ARCH", help=f"architectures: {', '.join(list_archs())}")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[128], help="batch sizes")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["no", "bf16"],
                        help="autocast precisions")
    parser.add_argument("--memory-formats", nargs="+", choices=list(FORMATS), default=["channels_last"],
                        help="memory formats")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time")
    parser.add_argument("--steps", type=positive_int, default=5, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="measurements per implementation, in alternating order; the best counts")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", type=Path, default=Path("bench.csv"), help="CSV file to write")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(1, device=device)
    except (RuntimeError, ValueError) as error:
        raise CardinalError(f"device {args.device!r} is not usable: {str(error).splitlines()[0]}") from None
    if args.output.is_dir():
        raise CardinalError(f"--output {args.output} is a folder; give a CSV file name")
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.touch()
    except OSError as error:
        raise CardinalError(f"cannot write {args.output}: {error.strerror or error}") from None
    console = make_console()
    console.print(f"benchmarking on {device} ({torch.get_num_threads()} threads), "
                  f"{args.steps} steps after {args.warmup} warm-up steps per configuration")
    frame = run_benchmark(args.archs, args.batch_sizes, args.precisions, args.memory_formats, args.modes,
                          args.steps, args.warmup, device, args.repeats,
                          on_row=lambda row: console.print(
                              f"  {row['arch']} {row['mode']} b{row['batch']} {row['precision']} "
                              f"{row['memory_format']}: {row['cardinal_img_per_s']:.1f} img/s "
                              f"(torchvision {row['torchvision_img_per_s']:.1f})"))
    try:
        write_csv(frame, args.output)
    except OSError as error:
        raise CardinalError(f"cannot write {args.output}: {error.strerror or error}") from None
    console.print(render(frame, f"Throughput on {device}"))
    console.print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    run(main)
