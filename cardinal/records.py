"""Per-epoch records: the CSV a comparison is built from, and the rich console views of it.

Every row carries the epoch's metrics and the run's identity (arch, size, precision, versions, command),
so a single CSV, or many concatenated, can be compared without any other file. The CSV is rewritten
atomically after each epoch: a run killed at any moment leaves a complete, readable file.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cardinal.cli import CardinalError, make_console
from cardinal.fileio import (
    atomic_target,
    cannot_write,
    is_stream,
    probe_writable,
    read_regular_file,
    resume_after_mending,
)

CSV_NAME = "epochs.csv"
CONFIG_NAME = "config.json"
MAX_CSV_BYTES = 64 << 20  # some 50,000 epochs of rows

EPOCH_COLUMNS = (
    "epoch", "train_loss", "train_objective", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s",
    "train_time_s", "eval_time_s", "steps", "skipped_steps", "it_per_s", "img_per_s", "train_tflop_per_s",
    "peak_mem_mb", "warm_up", "train_images", "test_images",
)
RUN_COLUMNS = (
    "run_name", "arch", "dataset", "recipe", "params", "gflops", "image_size", "global_batch", "world_size",
    "precision", "channels_last", "compiled", "device", "torch_version", "accelerate_version",
    "cardinal_version", "seed", "command",
)
COLUMNS = EPOCH_COLUMNS + RUN_COLUMNS  # what every run writes
# Written only when asked for: a validation split (--val-images), flip test-time augmentation (--eval-flip),
# an EMA of the weights (--ema-decay). Other evaluation modes never replace test_acc; they get columns of
# their own.
VALIDATION_COLUMNS = ("val_loss", "val_acc", "val_images")
FLIP_COLUMNS = ("test_acc_tta", "val_acc_tta")
EMA_COLUMNS = ("test_acc_ema", "val_acc_ema")
ORDER = EPOCH_COLUMNS[:EPOCH_COLUMNS.index("lr")] + VALIDATION_COLUMNS[:2] + FLIP_COLUMNS + EMA_COLUMNS + \
    EPOCH_COLUMNS[EPOCH_COLUMNS.index("lr"):] + VALIDATION_COLUMNS[2:] + RUN_COLUMNS
# the columns of numbers: a run's records are refused when one holds anything else
METRIC_COLUMNS = tuple(c for c in EPOCH_COLUMNS if c != "warm_up") + VALIDATION_COLUMNS + FLIP_COLUMNS + EMA_COLUMNS
TIMING_COLUMNS = ("epoch_time_s", "train_time_s", "eval_time_s", "it_per_s", "img_per_s",
                  "train_tflop_per_s", "peak_mem_mb", "warm_up")


def epoch_row(epoch: int, train, test, epoch_time_s: float, train_flops_per_image: float,
              peak_mem_mb: float, val=None, test_ema=None, val_ema=None, warm_up: bool = False) -> Dict[str, Any]:
    """Metrics of one finished epoch from engine.TrainStats / EvalStats (``val``: the validation split's;
    ``test_ema``, ``val_ema``: the weight average's on each split; ``warm_up``: the first epoch this process
    trained, whose speed holds warm-up and any compilation)."""
    seconds = max(train.time_s, 1e-9)
    row = {
        "epoch": epoch,
        "train_loss": train.loss,
        "train_objective": train.objective,
        "train_acc": train.accuracy,
        "test_loss": test.loss,
        "test_acc": test.accuracy,
        "lr": train.lr,
        "epoch_time_s": epoch_time_s,
        "train_time_s": train.time_s,
        "eval_time_s": test.time_s,
        "steps": train.steps,
        "skipped_steps": train.skipped_steps,
        "it_per_s": train.steps / seconds,
        "img_per_s": train.images / seconds,
        "train_tflop_per_s": train.images * train_flops_per_image / seconds / 1e12,
        "peak_mem_mb": peak_mem_mb,
        "warm_up": warm_up,
        "train_images": train.images,
        "test_images": test.images,
    }
    if val is not None:
        row.update(val_loss=val.loss, val_acc=val.accuracy, val_images=val.images)
    if test.flip_accuracy is not None:
        row["test_acc_tta"] = test.flip_accuracy
    if val is not None and val.flip_accuracy is not None:
        row["val_acc_tta"] = val.flip_accuracy
    if test_ema is not None:
        row["test_acc_ema"] = test_ema.accuracy
    if val_ema is not None:
        row["val_acc_ema"] = val_ema.accuracy
    return row


def check_output_file(path: Path, flag: str) -> None:
    """Fail before measuring, not after, when a result could not be written, and never write a result over a
    run's own records or config (an existing epochs.csv or config.json)."""
    if path.is_dir():
        raise CardinalError(f"{flag} {path} is a folder; give a file name")
    if path.name in (CSV_NAME, CONFIG_NAME) and path.is_file():
        raise CardinalError(f"{flag} {path} would replace a run's {path.name}; give another file name")
    if not is_stream(path):  # a stream is written into, not beside (fileio.atomic_target)
        probe_writable(path)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_target(path) as temp:
        frame.to_csv(temp, index=False)


def read_csv(path: Path) -> pd.DataFrame:
    """A run's epochs.csv; anything that is not one (garbage, empty, missing columns, a FIFO, a device, a file
    too large for any run) is a CardinalError."""
    try:
        frame = pd.read_csv(io.BytesIO(read_regular_file(path, MAX_CSV_BYTES)))
    except (OSError, UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        reason = getattr(error, "strerror", None) or str(error).strip() or type(error).__name__
        raise CardinalError(f"cannot read {path}: {reason.splitlines()[0]}") from None
    missing = [c for c in ("epoch", "test_acc") if c not in frame.columns]
    if missing:
        raise CardinalError(f"{path} is not a cardinal epochs CSV (missing columns: {', '.join(missing)})")
    if frame["epoch"].isna().any():
        raise CardinalError(f"{path} is not a cardinal epochs CSV (an epoch number is missing)")
    not_numbers = [c for c in METRIC_COLUMNS if c in frame.columns and not frame.empty
                   and not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numbers:
        raise CardinalError(f"{path} is not a cardinal epochs CSV (not numbers in: {', '.join(not_numbers)}); "
                            "restore it from a copy")
    return frame


def warm_up_rows(frame: pd.DataFrame) -> pd.Series:
    """Which epochs hold warm-up and compilation: the first each process trained (the ``warm_up`` column;
    epoch 1 where a row predates it)."""
    first = frame["epoch"] < 2
    if "warm_up" not in frame:
        return first
    said = frame["warm_up"].astype(str).str.lower().map({"true": True, "false": False})
    return said.fillna(first).astype(bool)


def steady_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The epochs whose speed is steady state: all but the warm-up ones, or every epoch if none is left."""
    steady = frame[~warm_up_rows(frame)]
    return steady if not steady.empty else frame


def speed_includes_warm_up(frame: pd.DataFrame) -> bool:
    """Whether steady_state had to use warm-up epochs (a run of one epoch, or of only first epochs)."""
    return bool(warm_up_rows(frame).all())


def steady_state(frame: pd.DataFrame, column: str) -> float:
    """Median of a speed column over the steady-state epochs (``steady_rows``)."""
    return float(steady_rows(frame)[column].median())


class RunRecords:
    """The rows of one run, written to ``<run_dir>/epochs.csv`` after every epoch."""

    def __init__(self, run_dir: Path, run_info: Dict[str, Any], previous: Optional[pd.DataFrame] = None):
        self.path = Path(run_dir) / CSV_NAME
        self.run_info = dict(run_info)
        self.rows: List[Dict[str, Any]] = [] if previous is None else previous.to_dict("records")

    def add(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        row = {**metrics, **self.run_info}
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        try:
            write_csv(self.frame(), self.path)
        except OSError as error:
            raise CardinalError(f"{cannot_write(self.path, error)}; its earlier rows are kept; "
                                f"{resume_after_mending(self.path.parent)}") from None
        return row

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        ordered = [c for c in ORDER if c in frame.columns]
        return frame[ordered + [c for c in frame.columns if c not in ordered]]


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt_lr(value: float, _digits: int = 0) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


# One row per epoch, 72 columns wide (an 80-column terminal holds it): (title, key, formatter, digits,
# width). it/s and the image counts are in the CSV; img/s is the comparable speed. A number wider than
# its column widens it rather than being cut.
EPOCH_VIEW = (
    ("Epoch", "epoch", _fmt, 0, 5), ("Train loss", "train_loss", _fmt, 4, 6),
    ("Train acc", "train_acc", _fmt, 2, 6), ("Test loss", "test_loss", _fmt, 4, 6),
    ("Test acc", "test_acc", _fmt, 2, 6), ("LR", "lr", _fmt_lr, 0, 7), ("img/s", "img_per_s", _fmt, 1, 7),
    ("TFLOP/s", "train_tflop_per_s", _fmt, 3, 7), ("Time s", "epoch_time_s", _fmt, 1, 6),
    ("Peak MB", "peak_mem_mb", _fmt, 0, 7),
)


def epoch_view(row: Dict[str, Any]) -> tuple:
    """The columns shown for a row: with a validation split, Val acc takes Train acc's place (same width)."""
    if "val_acc" not in row:
        return EPOCH_VIEW
    return tuple(("Val acc", "val_acc", *column[2:]) if column[1] == "train_acc" else column
                 for column in EPOCH_VIEW)


def epoch_cells(row: Dict[str, Any]) -> List[str]:
    return [format_(row.get(key), digits) for _, key, format_, digits, _ in epoch_view(row)]


class ConsoleReport:
    """Progress bar during an epoch, one table row per finished epoch, a final summary table.

    Rows are printed as they come (header once) so the table grows in the log, TTY or not.
    """

    def __init__(self, console: Optional[Console] = None, enabled: bool = True, progress: bool = True):
        self.console = console or make_console()
        self.enabled = enabled
        self.show_progress = enabled and progress and self.console.is_terminal
        self._progress: Optional[Progress] = None
        self._task = None
        self._header_printed = False

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)  # paths and names print as typed

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.show_progress:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, loss="-", rate="-")

    def step(self, loss: Optional[float]) -> None:
        if self._progress is None:
            return
        task = self._progress.tasks[0]
        fields = {"loss": f"{loss:.4f}"} if loss is not None else {}
        if task.speed:
            fields["rate"] = f"{task.speed:.2f}"
        self._progress.update(self._task, advance=1, **fields)

    def end_epoch(self, row: Dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self.enabled:
            return
        cells = epoch_cells(row)
        table = Table(show_header=not self._header_printed, box=None, pad_edge=False, show_edge=False,
                      padding=(0, 0, 0, 1))  # one space between columns, none at the edges
        for (title, _, _, _, width), cell in zip(epoch_view(row), cells):
            table.add_column(title, justify="right", width=max(width, len(cell)))
        table.add_row(*cells)
        self.console.print(table)
        self._header_printed = True

    def final(self, frame: pd.DataFrame, run_dir: Path) -> None:
        if not self.enabled or frame.empty:
            return
        first = frame.iloc[0]
        best = frame.loc[frame["test_acc"].idxmax()]
        last = frame.iloc[-1]
        table = Table(title=escape(f"{first['arch']} on {first['dataset']} ({first['recipe']} recipe)"),
                      show_header=False)
        table.add_column("")
        table.add_column("", justify="right", overflow="fold")  # a long path folds, never ends in "…"
        speed_epochs = "warm-up included" if speed_includes_warm_up(frame) else "after warm-up"
        extra = []
        if "val_acc" in frame and frame["val_acc"].notna().any():
            best_val = frame.loc[frame["val_acc"].idxmax()]
            extra += [("Final val acc %", _fmt(last["val_acc"], 2)),
                      ("Best val acc %", f"{best_val['val_acc']:.2f} (epoch {int(best_val['epoch'])})")]
        if "test_acc_tta" in frame and frame["test_acc_tta"].notna().any():
            extra.append(("Final test acc % (flip TTA)", _fmt(last["test_acc_tta"], 2)))
        if "test_acc_ema" in frame and frame["test_acc_ema"].notna().any():
            extra.append(("Final test acc % (EMA)", _fmt(last["test_acc_ema"], 2)))
        for label, value in (
            ("Parameters", f"{int(first['params']):,}"),
            ("GFLOPs / image", f"{first['gflops']:.2f}"),
            ("Epochs", f"{int(last['epoch'])}"),
            *extra,
            ("Final test acc %", _fmt(last["test_acc"], 2)),
            ("Best test acc %", f"{best['test_acc']:.2f} (epoch {int(best['epoch'])})"),
            (f"img/s (median, {speed_epochs})", _fmt(steady_state(frame, "img_per_s"), 1)),
            (f"it/s (median, {speed_epochs})", _fmt(steady_state(frame, "it_per_s"), 2)),
            (f"TFLOP/s (median, {speed_epochs})", _fmt(steady_state(frame, "train_tflop_per_s"), 3)),
            ("Total time s", _fmt(frame["epoch_time_s"].sum(), 1)),
            ("Precision / world", f"{first['precision']} / {int(first['world_size'])}"),
            ("Device", str(first["device"])),
            ("Records", str(run_dir / CSV_NAME)),
        ):
            table.add_row(escape(label), escape(value))
        self.console.print(table)

