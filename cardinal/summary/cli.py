"""The command line: flags, then load -> group -> compare -> render (-> plot); errors are one line, exit 2."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from cardinal.cli import ArgumentParser, CardinalError, positive_int, run
from cardinal.fileio import write_text_or_raise
from cardinal.records import check_output_file
from cardinal.summary import Summary, summarize
from cardinal.summary.plot import plot, require_matplotlib
from cardinal.summary.render import render_csv, render_markdown, render_table


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cardinal.summary",
        description="Compare runs: final test accuracy per setting (mean and 95% interval over seeds), "
                    "steady-state img/s, and the gaps between settings that differ only in arch or only in "
                    "recipe, at the end of runs of equal length. Files whose values fall outside their "
                    "meaning are skipped with one line each on stderr.")
    parser.add_argument("runs", nargs="*", type=Path, default=[Path("runs")],
                        help="run folders, folders holding runs, or epochs.csv files")
    parser.add_argument("--all", dest="everything", action="store_true",
                        help="table format: after the answer, also the per-epoch results, other accuracies, "
                             "models, speed, the gaps, takeaways and notes (markdown always holds them)")
    parser.add_argument("--every-pair", action="store_true",
                        help="per-epoch gaps and takeaways: every pair of a sweep's settings (by default each "
                             "is set against the best of them, as in the answer)")
    parser.add_argument("--epochs", nargs="+", type=positive_int, default=None,
                        help="epochs of the per-epoch tables (default: 1, 5 and the last of each model)")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table",
                        help="output format: table (fits the terminal, 80 columns included), markdown, or csv "
                             "(one row per model and epoch, every recipe knob a column: recipe.lr, ...)")
    parser.add_argument("--output", type=Path, default=None, help="write the output to this file too")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG: test accuracy by epoch and by training time, and img/s bars, per model "
                             "(needs matplotlib: pip install 'cardinal[plot]')")
    return parser


def render(summary: Summary, form: str, everything: bool = False) -> str:
    if form == "table":
        return render_table(summary, shutil.get_terminal_size((80, 24)).columns, everything)
    return render_markdown(summary) if form == "markdown" else render_csv(summary)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot is not None:
        require_matplotlib()
    summary = summarize(args.runs, args.epochs, args.every_pair)
    if summary.results.empty:
        raise CardinalError(f"none of the runs reached the epochs asked for ({' '.join(map(str, args.epochs))})")
    for path, flag in ((args.output, "--output"), (args.plot, "--plot")):
        if path is not None:  # before anything is printed or written
            check_output_file(path, flag)
    for skipped in summary.skipped:
        print(skipped, file=sys.stderr)
    text = render(summary, args.format, args.everything)
    print(text, end="")
    if args.output is not None:
        write_text_or_raise(args.output, text)
    if args.plot is not None:
        plot(summary, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    run(main)
