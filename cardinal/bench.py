"""Throughput of training steps and inference, cardinal's stack beside torchvision's, on this device.

    python -m cardinal.bench --archs resnet50 resnext50_32x4d --precisions no bf16 \\
        --memory-formats nchw channels_last --output bench.csv
    python -m cardinal.bench --compile --batch-sizes 128 512 --precisions bf16   # on a GPU

Each configuration is measured for cardinal's step and for the same architecture built from torchvision's
classes (``cardinal.reference``) in a plain eager loop (torch's default SGD), in the same process,
``--repeats`` times in alternating order after warm-up steps; the best of each counts, since noise on a
shared machine only slows a run. cardinal's step is the one ``cardinal.train`` takes on this device
(``cardinal.speedups``): compiled where it compiles (CUDA by default; ``--compile`` / ``--no-compile``), with
the fused SGD step on CUDA. When cardinal's step is compiled, a third peer is torchvision's model compiled
in the same mode (``torch.compile`` and nothing else), and the ratio to it is reported too. The warm-up
(compilation included) is timed apart and never counted in img/s; compiled peers warm up for at least 3
steps (CUDA graphs are recorded on the third call).
How far the repeats disagree is reported beside it (the spread, (max - min) / median), and a ratio whose
repeats disagree by more than ``--noise-limit`` percent is flagged: it cannot be told apart from noise.
Achieved TFLOP/s uses the counted forward FLOPs (x3 for a training step).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from rich import box
from rich.table import Table

from cardinal.cli import (
    ArgumentParser,
    CardinalError,
    make_console,
    non_negative_int,
    positive_float,
    positive_int,
    run,
)
from cardinal.cost import count_forward_flops
from cardinal.engine import synchronize
from cardinal.fileio import cannot_write
from cardinal.models import build_model, list_archs
from cardinal.prose import wrap
from cardinal.records import check_output_file, write_csv
from cardinal.reference import torchvision_model
from cardinal.speedups import (
    AUTO,
    COMPILE_MODE_CHOICES,
    compile_kwargs,
    compile_request,
    fused_optimizer,
    resolve_compile,
    tune_kernels,
)

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("train", "infer")
IMPLEMENTATIONS = ("cardinal", "torchvision")  # always measured
COMPILED_PEER = "torchvision_compiled"  # measured when cardinal's step is compiled
COMPILED_WARMUP = 3
NOISE_LIMIT_PCT = 10.0
NOISY_MARK = "*"


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def measure(model: torch.nn.Module, mode: str, batch: int, precision: str, memory_format, device: torch.device,
            steps: int, warmup: int, num_classes: int = 10, fused: bool | None = None,
            warmups: list[float] | None = None) -> float:
    """Steady-state images per second of ``steps`` steps after ``warmup`` unmeasured ones (their seconds are
    appended to ``warmups``). ``model`` may be a torch.compile wrapper; ``fused`` picks SGD's fused step."""
    model = model.to(device).to(memory_format=memory_format)
    inputs = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, num_classes, (batch,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fused)
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

    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    if warmups is not None:
        warmups.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


@dataclass
class Peer:
    """One implementation measured: its model (maybe a compiled wrapper) and how its step differs."""

    model: torch.nn.Module
    fused: bool | None = None  # SGD's fused step (None: torch's default)
    compiled: bool = False
    warmups: list[float] = field(default_factory=list)  # seconds of each measurement's warm-up steps


def measure_alternating(peers: dict[str, Peer], repeats: int, warmup: int, **settings) -> dict[str, list[float]]:
    """``repeats`` measurements of each implementation, the order reversed on every other repeat."""
    rates: dict[str, list[float]] = {name: [] for name in peers}
    order = list(peers)
    for repeat in range(repeats):
        for name in (order if repeat % 2 == 0 else order[::-1]):
            peer = peers[name]
            steps_first = max(warmup, COMPILED_WARMUP) if peer.compiled else warmup
            extra = {"fused": peer.fused} if peer.fused is not None else {}
            rates[name].append(measure(peer.model, warmup=steps_first, warmups=peer.warmups, **extra, **settings))
    return rates


def spread_pct(rates: Sequence[float]) -> float:
    """(max - min) / median of the repeats, in percent; NaN for a single measurement (nothing to compare)."""
    if len(rates) < 2:
        return math.nan
    return 100.0 * (max(rates) - min(rates)) / statistics.median(rates)


def is_noisy(spreads: Sequence[float], limit_pct: float) -> bool:
    """A ratio is noisy when the repeats of either implementation disagree by more than ``limit_pct``."""
    return any(spread > limit_pct for spread in spreads if not math.isnan(spread))


def result_columns(rates: dict[str, list[float]], flops_per_image: float, noise_limit_pct: float) -> dict:
    """Per implementation: best, median, spread and the raw repeats; then the ratio of the bests and its flag."""
    columns: dict = {}
    for name, repeats in rates.items():
        best = max(repeats)
        columns[f"{name}_img_per_s"] = best
        columns[f"{name}_median_img_per_s"] = statistics.median(repeats)
        columns[f"{name}_spread_pct"] = spread_pct(repeats)
        columns[f"{name}_repeats_img_per_s"] = ";".join(f"{rate:.6g}" for rate in repeats)
        columns[f"{name}_tflop_per_s"] = best * flops_per_image / 1e12
    columns["cardinal_vs_torchvision"] = max(rates["cardinal"]) / max(rates["torchvision"])
    if COMPILED_PEER in rates:
        columns[f"cardinal_vs_{COMPILED_PEER}"] = max(rates["cardinal"]) / max(rates[COMPILED_PEER])
    columns["noisy"] = is_noisy([columns[f"{name}_spread_pct"] for name in rates], noise_limit_pct)
    return columns


def make_peers(cardinal: torch.nn.Module, torchvision: torch.nn.Module, compiled: bool | str,
               device: torch.device, precision: str = "no") -> dict[str, Peer]:
    """cardinal's step as cardinal.train takes it on ``device`` in ``precision``, torchvision's eager loop,
    and torchvision compiled in the same mode when cardinal's step is compiled."""
    fused = fused_optimizer(device.type, precision)
    if not compiled:
        return {"cardinal": Peer(cardinal, fused), "torchvision": Peer(torchvision)}
    kwargs = compile_kwargs(str(compiled))
    return {"cardinal": Peer(torch.compile(cardinal, **kwargs), fused, compiled=True),
            "torchvision": Peer(torchvision),
            COMPILED_PEER: Peer(torch.compile(torchvision, **kwargs), compiled=True)}


def run_benchmark(archs: Sequence[str], batch_sizes: Sequence[int], precisions: Sequence[str],
                  memory_formats: Sequence[str], modes: Sequence[str], steps: int, warmup: int,
                  device: torch.device, repeats: int = 2, on_row=None,
                  noise_limit_pct: float = NOISE_LIMIT_PCT, compiled: bool | str = False) -> pd.DataFrame:
    """``compiled``: False, or the torch.compile mode of cardinal's step (see ``cardinal.speedups``)."""
    rows: list[dict] = []
    tune_kernels(device.type)  # process-wide: every peer gets it
    for arch in archs:
        torch.manual_seed(0)
        models = {"cardinal": build_model(arch), "torchvision": torchvision_model(arch)}
        models["torchvision"].load_state_dict(models["cardinal"].state_dict())
        flops = count_forward_flops(models["cardinal"])
        params = sum(p.numel() for p in models["cardinal"].parameters())
        for batch, precision, layout, mode in itertools.product(batch_sizes, precisions, memory_formats, modes):
            if compiled:
                torch._dynamo.reset()  # each configuration compiles afresh: static shapes, no recompile limit
            peers = make_peers(models["cardinal"], models["torchvision"], compiled, device, precision)
            rates = measure_alternating(peers, repeats, warmup, mode=mode, batch=batch, precision=precision,
                                        memory_format=FORMATS[layout], device=device, steps=steps)
            row = {"arch": arch, "params": params, "gflops": flops / 1e9, "mode": mode, "batch": batch,
                   "precision": precision, "memory_format": layout, "repeats": repeats,
                   "compiled": compiled}
            row.update(result_columns(rates, flops * (3 if mode == "train" else 1), noise_limit_pct))
            for name, peer in peers.items():  # the first warm-up holds the compilation
                row[f"{name}_warmup_s"] = peer.warmups[0] if peer.warmups else math.nan
            row["device"] = str(device)
            row["threads"] = torch.get_num_threads()
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return pd.DataFrame(rows)


# Settings shown in a row only where rows differ; a setting shared by all rows goes into the title.
SETTINGS = ("mode", "precision", "memory_format", "batch")


def setting_label(column: str, value) -> str:
    if column == "memory_format":
        return {"channels_last": "nhwc"}.get(value, str(value))
    return f"b{value}" if column == "batch" else str(value)


def format_pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}%"


def peers_of(frame: pd.DataFrame) -> tuple[str, ...]:
    return IMPLEMENTATIONS + ((COMPILED_PEER,) if f"{COMPILED_PEER}_img_per_s" in frame.columns else ())


def worst_spread_pct(row, peers: Sequence[str] = IMPLEMENTATIONS) -> float:
    """The largest spread of the implementations: the one that limits how far a ratio can be trusted."""
    spreads = [s for s in (getattr(row, f"{name}_spread_pct") for name in peers) if not math.isnan(s)]
    return max(spreads) if spreads else math.nan


def render(frame: pd.DataFrame, title: str) -> Table:
    """One row per configuration, narrow enough for an 80-column terminal; numbers never wrap."""
    varying = [column for column in SETTINGS if frame[column].nunique() > 1]
    shared = [setting_label(column, frame[column].iloc[0]) for column in SETTINGS if column not in varying]
    peers = peers_of(frame)
    with_compiled = COMPILED_PEER in peers
    if with_compiled:
        shared.append(f"cardinal compiled ({frame['compiled'].iloc[0]})")
    table = Table(title=f"{title}: {' '.join(shared)}" if shared else title, box=box.SIMPLE_HEAD,
                  collapse_padding=True, caption="spread: (max - min) / median of the repeated img/s of each "
                  "implementation; the largest is shown" + ("; tv: torchvision's img/s in an eager loop, and "
                                                            "compiled in cardinal's mode; TFLOP/s in the CSV"
                                                            if with_compiled else ""),
                  caption_justify="left")
    table.add_column("arch", no_wrap=True)
    if varying:
        table.add_column("setting", min_width=7)
    headers = (("cardinal\nimg/s", "tv\neager", "tv\ncomp.", "vs\neager", "vs\ncomp.") if with_compiled
               else ("cardinal\nimg/s", "torchvision\nimg/s", "ratio"))
    for header in (*headers, "spread", *(() if with_compiled else ("cardinal\nTFLOP/s",))):  # 80 columns
        table.add_column(header, justify="right", no_wrap=True)
    for row in frame.itertuples():
        setting = [" ".join(setting_label(column, getattr(row, column)) for column in varying)] if varying else []
        mark = NOISY_MARK if row.noisy else " "
        rates = [f"{getattr(row, f'{name}_img_per_s'):.{0 if with_compiled else 1}f}" for name in peers]
        ratios = [f"{row.cardinal_vs_torchvision:.2f}x" + mark]
        if with_compiled:
            ratios.append(f"{getattr(row, f'cardinal_vs_{COMPILED_PEER}'):.2f}x" + mark)
        flops = () if with_compiled else (f"{row.cardinal_tflop_per_s:.3f}",)
        table.add_row(row.arch, *setting, *rates, *ratios, format_pct(worst_spread_pct(row, peers)), *flops,
                      style="yellow" if row.noisy else None)
    return table


def noise_notes(frame: pd.DataFrame, limit_pct: float) -> list[str]:
    """The lines under the table: what a flagged ratio means and what to do about it."""
    notes = []
    if frame["noisy"].any():
        notes.append(f"{NOISY_MARK} noise: repeats differ by over {limit_pct:g}%; rerun with more --steps and "
                     "--repeats.")
    if (frame["repeats"] < 2).any():
        notes.append("one repeat: spread not measured, noise unknown; use --repeats 2 or more.")
    return notes


def progress_line(row: dict) -> str:
    line = (f"  {row['arch']} {row['mode']} b{row['batch']} {row['precision']} {row['memory_format']}: "
            f"{row['cardinal_img_per_s']:.1f} img/s (spread {format_pct(row['cardinal_spread_pct'])}), "
            f"torchvision {row['torchvision_img_per_s']:.1f} (spread {format_pct(row['torchvision_spread_pct'])})")
    if f"{COMPILED_PEER}_img_per_s" in row:
        line += (f", torchvision compiled {row[f'{COMPILED_PEER}_img_per_s']:.1f} "
                 f"(spread {format_pct(row[f'{COMPILED_PEER}_spread_pct'])}); warm-up with compilation: "
                 f"cardinal {row['cardinal_warmup_s']:.1f} s, torchvision {row[f'{COMPILED_PEER}_warmup_s']:.1f} s")
    return line


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "resnext50_32x4d"], choices=list_archs(),
                        metavar="ARCH", help="architectures")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[128], help="batch sizes")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["no", "bf16"],
                        metavar="PREC", help="autocast precisions")
    parser.add_argument("--memory-formats", nargs="+", choices=list(FORMATS), default=["channels_last"],
                        metavar="FORMAT", help="memory formats")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time")
    parser.add_argument("--steps", type=positive_int, default=5, help="measured steps per configuration")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="unmeasured steps first")
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="measurements per implementation, in alternating order; the best counts and "
                             "their spread is reported")
    parser.add_argument("--noise-limit", type=positive_float, default=NOISE_LIMIT_PCT, metavar="PCT",
                        help="flag a ratio whose repeats differ by more than this, in percent of their median")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile cardinal's step, and measure torchvision compiled the same way as a third "
                             "peer (default: on CUDA)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODE_CHOICES, default=AUTO, metavar="MODE",
                        help="torch.compile mode; auto: as cardinal.train picks it for one process")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", type=Path, default=Path("bench.csv"), help="CSV file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(1, device=device)
    except (RuntimeError, ValueError) as error:
        raise CardinalError(f"device {args.device!r} is not usable: {str(error).splitlines()[0]}") from None
    check_output_file(args.output, "--output")
    compiled = resolve_compile(compile_request(args.compile, args.compile_mode), device.type)
    console = make_console()
    console.print(f"benchmarking on {device} ({torch.get_num_threads()} threads), "
                  f"{args.steps} steps after {args.warmup} warm-up steps per configuration, "
                  f"{args.repeats} repeat(s) per implementation; cardinal's step "
                  + (f"compiled ({compiled}), torchvision eager and compiled" if compiled else "eager"))
    frame = run_benchmark(args.archs, args.batch_sizes, args.precisions, args.memory_formats, args.modes,
                          args.steps, args.warmup, device, args.repeats,
                          on_row=lambda row: console.print(progress_line(row), highlight=False),
                          noise_limit_pct=args.noise_limit, compiled=compiled)
    try:
        write_csv(frame, args.output)
    except OSError as error:
        raise cannot_write(args.output, error) from None
    console.print(render(frame, f"Throughput on {device}"))
    for note in noise_notes(frame, args.noise_limit):
        console.print(wrap(note, console, rest="  "), highlight=False, soft_wrap=True)  # at the reader's width
    console.print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    run(main)
