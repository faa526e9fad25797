"""The reference comparison in one command: each arch, seed, recipe and length trained, then the summary.

    python -m cardinal.study                                   # resnet50, resnext50_32x4d, resnext50_flat128
    python -m cardinal.study --data-dir ../shared/data/cifar10-sample --epochs 3 -- --mixed-precision bf16
    python -m cardinal.study --recipes seed fast --epochs 1 5 10 --seeds 0 1 2 --archs resnet50
    python -m cardinal.study --launcher "accelerate launch --config_file launch/multi-gpu-bf16.yaml"

Every run is a separate ``accelerate launch -m cardinal.train``, so each starts from the same state.
A recipe whose epoch k is itself a k-epoch run (a constant LR, nothing sized by the length: ``seed``)
trains once, for the longest length; the summary reads its epochs as the shorter runs.
Arguments after ``--`` (and any this runner does not know) go to every training run; they are checked as
cardinal.train checks them, for every run, before the first starts. A run that already
finished is skipped and one that was interrupted is resumed, so the study can simply be started again.
A run that fails ends the study with one line, last, that carries the run's own error; the launcher's
traceback of the failed child is left out.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, List, NoReturn, Optional, Sequence, Tuple

from cardinal.checkpoint import read_trainer_state
from cardinal.cli import ArgumentParser, CardinalError, positive_int, run, seed_int
from cardinal.config import RECIPES, Recipe, TrainConfig
from cardinal.data import DATASET_CHOICES
from cardinal.fileio import write_text_or_raise
from cardinal.models import list_archs
from cardinal.records import CONFIG_NAME

STUDY_ARCHS = ("resnet50", "resnext50_32x4d", "resnext50_flat128")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.study", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(STUDY_ARCHS), choices=list_archs(), metavar="ARCH",
                        help="architectures to compare")
    parser.add_argument("--seeds", nargs="+", type=seed_int, default=[0], help="one run per arch and seed")
    parser.add_argument("--epochs", nargs="+", type=positive_int, default=[10], metavar="N",
                        help="lengths: one run per length (a recipe whose epoch k is a k-epoch run, as seed's, "
                             "trains once, for the longest)")
    parser.add_argument("--recipes", "--recipe", nargs="+", dest="recipes", default=["seed"], metavar="RECIPE",
                        help=f"training recipes, each arch, seed and length under each (one of: "
                             f"{', '.join(RECIPES)}; see cardinal.train --help)")
    parser.add_argument("--dataset", default="cifar10", choices=DATASET_CHOICES, help="data set")
    parser.add_argument("--data-dir", default="data", help="CIFAR folder")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/study"), help="where the runs go")
    parser.add_argument("--launcher", default=None,
                        help="command that starts a training run, e.g. 'accelerate launch --config_file X' "
                             "(default: accelerate launch from this Python environment)")
    parser.add_argument("--report-epochs", nargs="+", type=positive_int, default=None, metavar="N",
                        help="epochs in the summary table (default: 1, 5 and the last)")
    parser.add_argument("--summary-format", choices=("table", "markdown", "csv"), default="table",
                        help="format of the summary (also written to OUTPUT_DIR/summary.<ext>)")
    parser.add_argument("--plot", action="store_true", help="also draw OUTPUT_DIR/summary.png")
    parser.add_argument("--no-summary", dest="summary", action="store_false",
                        help="train only (e.g. on every node but the first)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return parser


def run_name(arch: str, recipe: str, dataset: str, seed: int, epochs: Optional[int] = None) -> str:
    """The name cardinal.train gives a run by default, with its length where a study has several."""
    return f"{arch}-{recipe}-{dataset}" + (f"-e{epochs}" if epochs else "") + f"-seed{seed}"


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the study."""

    arch: str
    recipe: str
    epochs: int
    seed: int
    name: str
    described: str  # as a failure names it


def unique(values: Sequence) -> list:
    return list(dict.fromkeys(values))


def train_config(flags: Sequence[str]) -> TrainConfig:
    """The config cardinal.train makes of these flags, parsed as train parses them, so a typo or a bad
    value after ``--`` is refused before the first run starts rather than after hours of finished ones."""
    from cardinal.train import build_parser as train_parser
    from cardinal.train import config_from_args

    def refuse(message: str) -> NoReturn:
        raise CardinalError(f"flags for cardinal.train: {message} (see python -m cardinal.train --help)")

    parser = train_parser()
    parser.error = refuse  # type: ignore[method-assign]
    return config_from_args(parser.parse_args(flags))


def planned_recipe(name: str, extra: Sequence[str]) -> Recipe:
    """The recipe cardinal.train resolves for ``name`` with the study's pass-through flags."""
    return train_config(["--recipe", name, *extra]).recipe


def run_lengths(recipe: str, lengths: Sequence[int], extra: Sequence[str]) -> List[int]:
    """One run per length, or one of the longest where each epoch k of the recipe's runs is a k-epoch run."""
    lengths = sorted(unique(lengths))
    if len(lengths) > 1 and planned_recipe(recipe, extra).epochs_are_runs:
        return lengths[-1:]
    return lengths


def plan(args, extra: Sequence[str]) -> List[PlannedRun]:
    """Every run, one seed at a time (a study cut short still holds whole replicates to compare), then recipe
    by recipe, length by length, arch by arch; names carry the length only where lengths vary."""
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise CardinalError(f"unknown recipe {unknown[0]!r}; choose from: {', '.join(RECIPES)}")
    several = len(set(args.epochs)) > 1
    alone = not several and len(set(args.recipes)) == 1
    lengths = {recipe: run_lengths(recipe, args.epochs, extra) for recipe in unique(args.recipes)}
    runs = []
    for seed in unique(args.seeds):
        for recipe, recipe_lengths in lengths.items():
            for epochs in recipe_lengths:
                for arch in unique(args.archs):
                    described = f"{arch} (seed {seed})" if alone else f"{arch} ({recipe}, {epochs} epochs, seed {seed})"
                    runs.append(PlannedRun(arch, recipe, epochs, seed,
                                           run_name(arch, recipe, args.dataset, seed, epochs if several else None),
                                           described))
    return runs


def default_launcher() -> List[str]:
    """``accelerate launch`` from this Python with every value it would otherwise warn about: the user's
    accelerate config when there is one, else one machine, every visible GPU (or one process), no mixed
    precision (train's --mixed-precision still decides) and no dynamo, as accelerate itself would pick.
    ``--quiet`` drops accelerate's traceback of a failed single-process run."""
    from accelerate.commands.config import default_config_file

    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if os.path.isfile(default_config_file):
        return command
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return command + (["--multi_gpu"] if gpus > 1 else []) + [
        "--num_processes", str(max(1, gpus)), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no"]


def launcher_command(launcher: Optional[str]) -> List[str]:
    if not launcher:
        return default_launcher()
    try:
        return shlex.split(launcher)
    except ValueError as error:
        raise CardinalError(f"cannot parse --launcher {launcher!r}: {error}") from None


def planned_run(run_dir: Path) -> Optional[Recipe]:
    """The recipe an existing run folder was started with, or None when there is none."""
    config = planned_config(run_dir)
    return None if config is None else config.recipe


def planned_config(run_dir: Path) -> Optional[TrainConfig]:
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise CardinalError(f"{path} is not a valid run config; move {run_dir} aside to train that run again") from None


def check_length(run_dir: Path, planned: Recipe, epochs: int) -> None:
    """A study of N epochs may reuse a run planned for N epochs, or lengthen one whose LR schedule does not
    depend on its length (Recipe.length_free, the rule cardinal.train applies on resume)."""
    if planned.epochs == epochs or (planned.epochs < epochs and planned.length_free):
        return
    raise CardinalError(f"{run_dir} was planned for {planned.epochs} epochs ({planned.schedule} LR "
                        f"schedule), not {epochs}; its schedule would differ from a {epochs}-epoch run's, "
                        "so use another --output-dir for this study")


def train_command(args, planned: PlannedRun, extra: Sequence[str]) -> List[str]:
    """Start the run, or resume it (a changed --dataset is then refused by train).

    On resume --epochs is passed only to lengthen a constant-schedule run; otherwise the run keeps its own.
    """
    run_dir = args.output_dir / planned.name
    command = launcher_command(args.launcher) + ["-m", "cardinal.train"]
    saved = planned_run(run_dir)
    if saved is not None:
        check_length(run_dir, saved, planned.epochs)
        longer = ["--epochs", str(planned.epochs)] if saved.epochs != planned.epochs else []
        data = ["--dataset", args.dataset, "--data-dir", args.data_dir]
        return command + ["--resume", str(run_dir), *longer, *data, *extra]
    return command + [*decided_flags(args, planned), *extra]


def decided_flags(args, planned: PlannedRun) -> List[str]:
    """What the study sets for a run it starts: the pass-through flags may not set these again."""
    return ["--arch", planned.arch, "--recipe", planned.recipe, "--seed", str(planned.seed),
            "--epochs", str(planned.epochs), "--dataset", args.dataset, "--data-dir", args.data_dir,
            "--output-dir", str(args.output_dir), "--run-name", planned.name]


def _is_launcher_traceback(block: Sequence[str]) -> bool:
    """accelerate's own traceback when the script it started failed: the script has said why already."""
    return block[-1].startswith("subprocess.CalledProcessError")


def relay_stderr(lines: Iterable[str], out: IO[str]) -> List[str]:
    """Pass a child's stderr on as it comes, less the launcher's traceback; its ``error:`` lines are held
    back and returned, so the caller can end with them."""
    errors: List[str] = []
    block: List[str] = []
    for line in lines:
        if block or line.startswith("Traceback (most recent call last):"):
            block.append(line)
            if len(block) > 1 and not line[:1].isspace():  # the exception line ends a traceback
                if not _is_launcher_traceback(block):
                    out.writelines(block)
                block = []
        elif line.startswith("error: "):
            errors.append(line)
        else:
            out.write(line)
        out.flush()
    out.writelines(block)
    return errors


def run_training(command: Sequence[str]) -> Tuple[int, List[str]]:
    """Run one training; its stdout as it is, its stderr through ``relay_stderr``."""
    try:
        child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    except FileNotFoundError:
        raise CardinalError(f"launcher not found: {command[0]} (see --launcher)") from None
    with child:
        errors = relay_stderr(child.stderr, sys.stderr)
    return child.wait(), errors


def missing_exports(run_dir: Path, config: TrainConfig) -> List[str]:
    """The export files a finished run should hold (none with --no-export) that are not there yet."""
    if not config.export:
        return []
    names = ["model.ts", "model.pt2", "model_state.pt"] + (["model_ema_state.pt"] if config.recipe.ema_decay else [])
    return [name for name in names if not (run_dir / name).is_file()]


def finished(run_dir: Path, epochs: int) -> bool:
    """Trained for ``epochs`` and exported; a run killed during its export is resumed, which only exports."""
    config = planned_config(run_dir)
    if config is None:
        return False
    check_length(run_dir, config.recipe, epochs)
    state = read_trainer_state(run_dir)
    return state is not None and state.get("epoch", 0) >= epochs and not missing_exports(run_dir, config)


def check_train_flags(args, runs: Sequence[PlannedRun], extra: Sequence[str]) -> None:
    """Before any run: every run's flags must make a config cardinal.train accepts, and the pass-through
    flags may not set what the study sets per run (given twice, they would send runs elsewhere)."""
    from cardinal.train import explicit_flags
    from cardinal.validate import validate_config

    for planned in runs:
        validate_config(train_config([*decided_flags(args, planned), *extra]))
    decided = decided_flags(args, runs[0])
    pairs = [*zip(decided[::2], decided[1::2]), ("--resume", str(args.output_dir / runs[0].name))]
    flag_of = {field: flag for flag, value in pairs for field in explicit_flags([flag, value])}
    given = explicit_flags(extra)
    taken = [flag for field, flag in flag_of.items() if field in given]
    if taken:
        raise CardinalError(f"{', '.join(taken)}: the study sets this for each run; pass the study's own "
                            "flag (--archs, --recipes, --epochs, --seeds, --dataset, --data-dir, --output-dir)")


def write_study_record(args, runs: Sequence[PlannedRun], extra: Sequence[str]) -> None:
    """study.json: what the study was asked for, beside its runs."""
    path = args.output_dir / "study.json"
    record = {"archs": unique(args.archs), "seeds": unique(args.seeds), "epochs": unique(args.epochs),
              "recipes": unique(args.recipes), "dataset": args.dataset, "launcher": args.launcher,
              "train_args": list(extra), "runs": [planned.name for planned in runs]}
    write_text_or_raise(path, json.dumps(record, indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        argv, passthrough = argv[:split], argv[split + 1:]
    else:
        passthrough = []
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    extra = unknown + passthrough
    runs = plan(args, extra)
    check_train_flags(args, runs, extra)
    for planned in runs:
        run_dir = args.output_dir / planned.name
        if finished(run_dir, planned.epochs):
            print(f"{run_dir}: already trained for {planned.epochs} epochs, skipped", flush=True)
            continue
        command = train_command(args, planned, extra)
        print("$ " + shlex.join(command), flush=True)
        if args.dry_run:
            continue
        code, errors = run_training(command)
        if code == 0:
            sys.stderr.writelines(errors)
            continue
        sys.stderr.writelines(errors[:-1])
        why = errors[-1][len("error: "):].strip() if errors else f"exit code {code}"
        raise CardinalError(f"training {planned.described} failed: {why}; finished runs are kept in "
                            f"{args.output_dir}, run the study again to resume")
    if not args.summary or args.dry_run:
        return 0
    from cardinal import summary

    extension = {"table": "txt", "markdown": "md", "csv": "csv"}[args.summary_format]
    summary_args = [str(args.output_dir / planned.name) for planned in runs]
    summary_args += ["--format", args.summary_format, "--output", str(args.output_dir / f"summary.{extension}")]
    if args.report_epochs:
        summary_args += ["--epochs", *map(str, args.report_epochs)]
    if args.plot:
        summary_args += ["--plot", str(args.output_dir / "summary.png")]
    write_study_record(args, runs, extra)
    return summary.main(summary_args)


if __name__ == "__main__":
    run(main)
