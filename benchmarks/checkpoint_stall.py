"""How long a checkpoint holds up the training loop: written in the loop, or copied and written in the
background (what cardinal.train does), measured in one run on the current device.

For each way the real model, its SGD momentum and (with --ema) its weight average are saved --repeats
times into a scratch folder, alternating the two ways. Reported: the seconds the loop is held (best and
median), the seconds until the background write is on disk, and the ratio of the held times.

    python benchmarks/checkpoint_stall.py --arch resnet50 --ema
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table

from cardinal import build_model
from cardinal.checkpoint_writer import CheckpointWriter
from cardinal.ema import build_average
from cardinal.engine import synchronize


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--ema", action="store_true", help="also save a weight average, as --ema-decay does")
    parser.add_argument("--repeats", type=int, default=3, help="saves per way")
    parser.add_argument("--folder", type=Path, default=None, help="scratch folder (default: a temporary one)")
    return parser.parse_args(argv)


def trained_state(arch: str, device: torch.device):
    """A model with one optimizer step taken, so the momentum buffers exist as in a real run."""
    model = build_model(arch).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(4, 3, 32, 32, device=device)).sum().backward()
    optimizer.step()
    return model, optimizer


def timed_save(writer: CheckpointWriter, model, optimizer, average, epoch: int, device) -> tuple:
    """(seconds the caller was held, seconds until the checkpoint was on disk)."""
    synchronize(device)
    start = time.perf_counter()
    writer.save(model, optimizer, {"epoch": epoch}, average)
    held = time.perf_counter() - start
    writer.wait()
    return held, time.perf_counter() - start


def measure(folder: Path, arch: str, ema: bool, repeats: int) -> dict:
    accelerator = Accelerator()
    device = accelerator.device
    model, optimizer = trained_state(arch, device)
    average = build_average(model, 0.999) if ema else None
    writers = {"in the loop": CheckpointWriter(accelerator, folder / "loop", background=False),
               "background": CheckpointWriter(accelerator, folder / "background", background=True)}
    times = {name: [] for name in writers}
    for epoch in range(1, repeats + 1):
        for name, writer in writers.items():
            times[name].append(timed_save(writer, model, optimizer, average, epoch, device))
    size = sum(path.stat().st_size for path in (folder / "loop" / "checkpoint").iterdir())
    return {"device": str(device), "times": times, "megabytes": size / 1e6}


def report(result: dict, arch: str, ema: bool) -> None:
    table = Table(title=f"{arch}{' + EMA' if ema else ''} checkpoint ({result['megabytes']:.0f} MB) on "
                        f"{result['device']}")
    for column in ("written", "loop held, best s", "loop held, median s", "on disk, median s"):
        table.add_column(column, justify="right" if column != "written" else "left")
    held = {}
    for name, runs in result["times"].items():
        held[name] = min(run[0] for run in runs)
        table.add_row(name, f"{held[name]:.3f}", f"{statistics.median(r[0] for r in runs):.3f}",
                      f"{statistics.median(r[1] for r in runs):.3f}")
    console = Console()
    console.print(table)
    console.print(f"background / in the loop, loop held (best): "
                  f"{held['background'] / max(held['in the loop'], 1e-9):.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.folder is not None:
        args.folder.mkdir(parents=True, exist_ok=True)
        result = measure(args.folder, args.arch, args.ema, args.repeats)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            result = measure(Path(scratch), args.arch, args.ema, args.repeats)
    report(result, args.arch, args.ema)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
