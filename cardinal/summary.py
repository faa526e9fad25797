"""Compare runs: the results table, the size and arithmetic of each model, and computed takeaways.

    python -m cardinal.summary                         # every run under runs/
    python -m cardinal.summary runs/study --epochs 1 5 10 --format markdown --output study.md
    python -m cardinal.summary runs/study --plot study.png

Runs of the same arch, dataset and recipe with different seeds are aggregated as mean +- std (n runs).
Speed is read against arithmetic: params, GFLOPs and achieved TFLOP/s stand beside img/s, and the speed
ratio between models is given both raw and per FLOP.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd
from rich.console import Console
from rich.table import Table

from cardinal.cli import ArgumentParser, CardinalError, make_console, positive_int, run
from cardinal.fileio import write_text_atomic
from cardinal.records import CONFIG_NAME, CSV_NAME

REQUIRED = ("epoch", "train_loss", "test_acc", "it_per_s", "img_per_s", "epoch_time_s", "arch", "params",
            "gflops", "train_tflop_per_s", "seed")
GROUP_KEYS = ("arch", "dataset", "recipe")
METRICS = (  # title, column, digits
    ("Train Loss", "train_loss", 4), ("Test Acc %", "test_acc", 2), ("it/s", "it_per_s", 2),
    ("img/s", "img_per_s", 1), ("Epoch time s", "epoch_time_s", 1),
)


@dataclass
class Run:
    path: Path
    frame: pd.DataFrame
    planned_epochs: Optional[int]

    @property
    def in_progress(self) -> bool:
        return self.planned_epochs is not None and int(self.frame["epoch"].max()) < self.planned_epochs


def find_csvs(paths: Sequence[Path]) -> List[Path]:
    found: List[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(CSV_NAME)))
        else:
            raise CardinalError(f"{path} does not exist")
    unique = {csv.resolve(): csv for csv in found}  # a run named twice (runs runs/x) counts once
    return list(unique.values())


def read_run(csv: Path) -> Run:
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise CardinalError(f"cannot read {csv}: {str(error).splitlines()[0] if str(error) else 'empty'}") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise CardinalError(f"{csv} is not a cardinal epochs CSV (missing columns: {', '.join(missing)})")
    if frame.empty:
        raise CardinalError(f"{csv} holds no epochs yet")
    for column in ("dataset", "recipe"):
        if column not in frame.columns:
            frame[column] = "?"
    try:
        frame["epoch"] = frame["epoch"].astype(int)
        frame[list(REQUIRED[1:6])] = frame[list(REQUIRED[1:6])].astype(float)
    except (ValueError, TypeError):
        raise CardinalError(f"{csv} has non-numeric values in its metric columns") from None
    planned = None
    config = csv.parent / CONFIG_NAME
    if config.is_file():
        try:
            planned = int(json.loads(config.read_text())["recipe"]["epochs"])
        except (ValueError, KeyError, TypeError):
            planned = None
    frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")
    return Run(csv, frame, planned)


def load_runs(paths: Sequence[Path]) -> List[Run]:
    csvs = find_csvs(paths)
    if not csvs:
        raise CardinalError(f"no {CSV_NAME} found under {', '.join(str(p) for p in paths)}")
    return [read_run(csv) for csv in csvs]


def _mean_std(values: pd.Series) -> Tuple[float, float, int]:
    values = values.dropna()
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return float(values.mean()), std, len(values)


def combined(runs: List[Run]) -> pd.DataFrame:
    """All rows, each with its run, its status and a model label (naming the dataset when runs mix them)."""
    frame = pd.concat([r.frame.assign(_run=str(r.path), _progress=r.in_progress) for r in runs],
                      ignore_index=True)
    label = frame["arch"].astype(str) + " (" + frame["recipe"].astype(str)
    if frame["dataset"].nunique() > 1:
        label = label + ", " + frame["dataset"].astype(str)
    frame["model"] = label + ")"
    return frame


def results_table(runs: List[Run], epochs: Optional[Sequence[int]]) -> pd.DataFrame:
    """One row per model and reported epoch; metrics as mean, std and the number of runs."""
    frame = combined(runs)
    rows = []
    for key, group in frame.groupby(list(GROUP_KEYS), sort=False):
        last = int(group["epoch"].max())
        wanted = sorted(set(epochs) if epochs else {1, 5, last})
        for epoch in wanted:
            at = group[group["epoch"] == epoch]
            if at.empty:
                continue
            row = {"model": group["model"].iloc[0], "arch": key[0], "dataset": key[1], "recipe": key[2], "epoch": epoch}
            for _, column, _ in METRICS:
                row[column], row[f"{column}_std"], row["runs"] = _mean_std(at[column])
            rows.append(row)
    return pd.DataFrame(rows)


def models_table(runs: List[Run]) -> pd.DataFrame:
    """Size, arithmetic and achieved speed of each model, with best epoch and run status."""
    frame = combined(runs)
    rows = []
    for key, group in frame.groupby(list(GROUP_KEYS), sort=False):
        per_epoch = group.groupby("epoch")["test_acc"].mean()
        rows.append({
            "model": group["model"].iloc[0], "arch": key[0], "dataset": key[1], "recipe": key[2],
            "params": int(group["params"].iloc[0]), "gflops": float(group["gflops"].iloc[0]),
            "img_per_s": float(group["img_per_s"].mean()),
            "train_tflop_per_s": float(group["train_tflop_per_s"].mean()),
            "best_epoch": int(per_epoch.idxmax()), "best_test_acc": float(per_epoch.max()),
            "epochs": int(group["epoch"].max()), "runs": int(group["_run"].nunique()),
            "seeds": ",".join(str(s) for s in sorted(group["seed"].unique())),
            "in_progress": int(group.drop_duplicates("_run")["_progress"].sum()),
        })
    return pd.DataFrame(rows)


def takeaways(results: pd.DataFrame, models: pd.DataFrame) -> List[str]:
    """Statements computed from the data: speed ratios (raw, per FLOP), accuracy gaps, best epochs."""
    lines: List[str] = []
    if models.empty:
        return lines
    base = models.iloc[0]
    for other in models.iloc[1:].itertuples():
        raw = other.img_per_s / base.img_per_s
        per_flop = other.train_tflop_per_s / base.train_tflop_per_s
        lines.append(
            f"{other.model} trains at {raw:.2f}x the img/s of {base.model}; per FLOP it runs at {per_flop:.2f}x "
            f"({other.gflops:.2f} vs {base.gflops:.2f} GFLOPs/image, {other.train_tflop_per_s:.3f} vs "
            f"{base.train_tflop_per_s:.3f} TFLOP/s achieved).")
        for epoch in sorted(results["epoch"].unique()):
            a = results[(results["model"] == other.model) & (results["epoch"] == epoch)]
            b = results[(results["model"] == base.model) & (results["epoch"] == epoch)]
            if not a.empty and not b.empty:
                gap = a["test_acc"].iloc[0] - b["test_acc"].iloc[0]
                lines.append(f"At epoch {epoch}, {other.model} is {gap:+.2f} points of test accuracy "
                             f"against {base.model} ({a['test_acc'].iloc[0]:.2f}% vs {b['test_acc'].iloc[0]:.2f}%).")
    for model in models.itertuples():
        status = f", {model.in_progress} run(s) still in progress" if model.in_progress else ""
        lines.append(f"{model.model}: best mean test accuracy {model.best_test_acc:.2f}% at epoch "
                     f"{model.best_epoch} of {model.epochs} ({model.runs} run(s), seeds {model.seeds}{status}).")
    return lines


def _cell(row, column: str, digits: int) -> str:
    value, std = row[column], row.get(f"{column}_std", math.nan)
    text = f"{value:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _model_cells(row) -> List[str]:
    return [row["model"], f"{row['params'] / 1e6:.2f}", f"{row['gflops']:.2f}", f"{row['img_per_s']:.1f}",
            f"{row['train_tflop_per_s']:.3f}", f"{row['best_test_acc']:.2f} (ep {row['best_epoch']})",
            str(row["runs"])]


MODEL_HEADERS = ["Model", "Params (M)", "GFLOPs", "img/s", "TFLOP/s", "Best test acc %", "Runs"]
RESULT_HEADERS = ["Model", "Epoch"] + [title for title, _, _ in METRICS] + ["n"]


def _result_cells(row) -> List[str]:
    return [row["model"], str(int(row["epoch"]))] + [_cell(row, c, d) for _, c, d in METRICS] + [str(int(row["runs"]))]


def _rich_table(title: str, headers: List[str], rows: List[List[str]]) -> Table:
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="left" if header == "Model" else "right")
    for cells in rows:
        table.add_row(*cells)
    return table


def render_rich(results: pd.DataFrame, models: pd.DataFrame, lines: List[str], console: Console) -> None:
    console.print(_rich_table("Results", RESULT_HEADERS, [_result_cells(r) for _, r in results.iterrows()]))
    console.print(_rich_table("Models", MODEL_HEADERS, [_model_cells(r) for _, r in models.iterrows()]))
    console.print("Takeaways")
    for line in lines:
        console.print(f"- {line}", highlight=False)


def _markdown_table(headers: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(out)


def render_markdown(results: pd.DataFrame, models: pd.DataFrame, lines: List[str]) -> str:
    parts = ["## Results", "", _markdown_table(RESULT_HEADERS, [_result_cells(r) for _, r in results.iterrows()]),
             "", "## Models", "", _markdown_table(MODEL_HEADERS, [_model_cells(r) for _, r in models.iterrows()]),
             "", "## Takeaways", ""] + [f"- {line}" for line in lines]
    return "\n".join(parts) + "\n"


def render_csv(results: pd.DataFrame, models: pd.DataFrame) -> str:
    merged = results.merge(models[["model", "params", "gflops", "train_tflop_per_s"]], on="model", how="left")
    return merged.to_csv(index=False)


def plot(runs: List[Run], models: pd.DataFrame, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CardinalError("--plot needs matplotlib: pip install 'cardinal[plot]'") from None
    frame = combined(runs)
    figure, (acc, loss, speed) = plt.subplots(1, 3, figsize=(16, 4.5))
    for key, group in frame.groupby(list(GROUP_KEYS), sort=False):
        mean = group.groupby("epoch")[["test_acc", "train_loss"]].mean()
        acc.plot(mean.index, mean["test_acc"], marker="o", label=group["model"].iloc[0])
        loss.plot(mean.index, mean["train_loss"], marker="o", label=group["model"].iloc[0])
    from matplotlib.ticker import MaxNLocator

    for axis in (acc, loss):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc.set(title="Test accuracy", xlabel="epoch", ylabel="%")
    loss.set(title="Train loss", xlabel="epoch", ylabel="cross-entropy")
    speed.bar(range(len(models)), models["img_per_s"])
    speed.set_xticks(range(len(models)), models["model"], rotation=20, ha="right")
    speed.set(title="Training throughput", ylabel="img/s")
    acc.legend()
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=110)
    except OSError as error:
        raise CardinalError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        plt.close(figure)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.summary", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, default=[Path("runs")],
                        help="run folders, folders holding runs, or epochs.csv files")
    parser.add_argument("--epochs", nargs="+", type=positive_int, default=None,
                        help="epochs to report (default: 1, 5 and the last of each model)")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table", help="output format")
    parser.add_argument("--output", type=Path, default=None, help="write the output to this file too")
    parser.add_argument("--plot", type=Path, default=None, help="PNG with accuracy, loss and img/s per model")
    return parser


def summarize(paths: Sequence[Path], epochs: Optional[Sequence[int]] = None):
    runs = load_runs(paths)
    results = results_table(runs, epochs)
    models = models_table(runs)
    return runs, results, models, takeaways(results, models)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    runs, results, models, lines = summarize(args.runs, args.epochs)
    if results.empty:
        raise CardinalError(f"none of the runs reached the epochs asked for ({' '.join(map(str, args.epochs))})")
    if args.format == "table":
        capture = Console(file=io.StringIO(), width=max(make_console().width, 140))
        render_rich(results, models, lines, capture)
        text = capture.file.getvalue()
    elif args.format == "markdown":
        text = render_markdown(results, models, lines)
    else:
        text = render_csv(results, models)
    print(text, end="")
    if args.output is not None:
        try:
            write_text_atomic(args.output, text)
        except OSError as error:
            raise CardinalError(f"cannot write {args.output}: {error.strerror or error}") from None
    if args.plot is not None:
        plot(runs, models, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    run(main)
