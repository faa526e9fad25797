"""The lines of benchmarks/gpu_speed.sh's summary: bench ratios against their goals, and epoch wall times.

    python benchmarks/gpu_speed_report.py bench bench-eager.csv bench-compiled.csv
    python benchmarks/gpu_speed_report.py bench --fast-batch 288 bench-eager.csv bench-compiled.csv
    python benchmarks/gpu_speed_report.py wall epoch-wall.log wall/epochs.csv

``--fast-batch B`` adds, per arch, how fast batch B trains eagerly (fast's default batch: its short runs do
not compile) against the fastest batch of either bench, compiled or not; the goal is 0.8x. Where that
batch compiled, the line also sets B against the fastest eager batch, which tells the batch's own cost
apart from compilation's gain.

``wall`` reads a cardinal.train log whose lines carry the time they were printed (seconds, then a space):
an epoch's row is printed after its training, evaluation, checkpoint and records, so the time from one row
to the next is the later epoch's wall time. The first epoch (compilation, warm-up) has no earlier row.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

WALL_GOAL = 1.15
DEFAULT_BATCH_GOAL = 0.8
EPOCH_ROW = re.compile(r"\s*(\d+)\s+-?\d+\.\d+\s")  # "    2 2.2202  16.80 ..." (rich's epoch table)


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def bench_lines(paths: list[str]) -> list[str]:
    lines = []
    for path in paths:
        try:
            rows = read_rows(path)
        except OSError:
            continue
        lines.append(Path(path).name + ":")
        for row in rows:
            value = lambda key, row=row: float(row[key])  # noqa: E731
            line = (f"  {row['arch']} b{row['batch']}: cardinal {value('cardinal_img_per_s'):.0f} img/s "
                    f"({value('cardinal_tflop_per_s'):.1f} TFLOP/s), vs torchvision eager "
                    f"{value('cardinal_vs_torchvision'):.2f}x")
            if "cardinal_vs_torchvision_compiled" in row:
                line += (f", vs torchvision compiled {value('cardinal_vs_torchvision_compiled'):.2f}x; warm-up with "
                         f"compilation {value('cardinal_warmup_s'):.0f} s and "
                         f"{value('torchvision_compiled_warmup_s'):.0f} s")
            lines.append(line + (" (noisy)" if row["noisy"] == "True" else ""))
    lines.append("goals (compiled): >= 1.3x torchvision eager at batch 512, >= 2x at 128, "
                 ">= 1.0x torchvision compiled")
    return lines


def default_batch_lines(paths: list[str], batch: int) -> list[str]:
    """Per arch: batch ``batch`` eager against the fastest row of the benches."""
    rows = []
    for path in paths:
        try:
            rows += read_rows(path)
        except OSError:
            continue
    speed = lambda row: float(row["cardinal_img_per_s"])  # noqa: E731
    lines = []
    for arch in dict.fromkeys(row["arch"] for row in rows):
        mine = [r for r in rows if r["arch"] == arch]
        eager = [r for r in mine if int(r["batch"]) == batch and r["compiled"] == "False"]
        if not eager:
            lines.append(f"  {arch}: batch {batch} was not benched eagerly")
            continue
        best = max(mine, key=speed)
        how = "eager" if best["compiled"] == "False" else f"compiled ({best['compiled']})"
        line = (f"  {arch}: fast's default batch {batch}, eager, {speed(eager[0]):.0f} img/s = "
                f"{speed(eager[0]) / speed(best):.2f}x the fastest bench row (batch {best['batch']}, {how}, "
                f"{speed(best):.0f} img/s; goal >= {DEFAULT_BATCH_GOAL}x)")
        if how != "eager":  # the batch's own cost, apart from what compiling adds
            best_eager = max((r for r in mine if r["compiled"] == "False"), key=speed)
            line += (f"; {speed(eager[0]) / speed(best_eager):.2f}x the fastest eager row (batch "
                     f"{best_eager['batch']}, {speed(best_eager):.0f} img/s)")
        lines.append(line)
    return lines


def row_times(log_lines: list[str]) -> dict[int, float]:
    """When each epoch's row was first printed."""
    stamps: dict[int, float] = {}
    for line in log_lines:
        stamp, _, text = line.partition(" ")
        match = EPOCH_ROW.match(text)
        if match and int(match.group(1)) not in stamps:
            try:
                stamps[int(match.group(1))] = float(stamp)
            except ValueError:
                continue
    return stamps


def wall_lines(log_lines: list[str], rows: list[dict]) -> list[str]:
    stamps = row_times(log_lines)
    lines, ratios = [], []
    for row in sorted(rows, key=lambda r: int(r["epoch"])):
        epoch = int(row["epoch"])
        if epoch - 1 not in stamps or epoch not in stamps:
            continue
        wall = stamps[epoch] - stamps[epoch - 1]
        train, evaluate = float(row["train_time_s"]), float(row["eval_time_s"])
        ratios.append(wall / train)
        lines.append(f"epoch {epoch}: wall {wall:.2f} s, training {train:.2f} s, evaluation {evaluate:.2f} s, "
                     f"the rest (checkpoint, records) {wall - train - evaluate:.2f} s: wall / training "
                     f"{wall / train:.3f}")
    lines.append(f"wall / training, epochs 2+: {max(ratios):.3f} at worst (goal <= {WALL_GOAL})" if ratios
                 else "no epoch after the first to time")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["bench"] and argv[1:2] == ["--fast-batch"] and len(argv) > 2 and argv[2].isdigit():
        print("\n".join(bench_lines(argv[3:]) + default_batch_lines(argv[3:], int(argv[2]))))
    elif argv[:1] == ["bench"]:
        print("\n".join(bench_lines(argv[1:])))
    elif argv[:1] == ["wall"] and len(argv) == 3:
        log = Path(argv[1]).read_text(errors="replace").splitlines()
        print("\n".join(wall_lines(log, read_rows(argv[2]))))
    else:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
