"""Export a model as TorchScript, a ``torch.export`` program and a plain state_dict.

TorchScript (``.ts``) loads with ``torch.jit.load`` from C++ or Python without this package; recent
torch releases deprecate it, so its warning is silenced here and the README says when to prefer the
``torch.export`` program (``.pt2``), which is what new deployment paths (AOTInductor, ExecuTorch) take.

Given a ``Normalization``, both take float RGB images in [0, 1] (NCHW) and apply the training run's
mean/std inside (``NormalizedInput``), so a user cannot feed them the wrong normalisation; the state_dict
file stays a plain state_dict, and its mean/std go into a JSON file beside it (``<stem>.json``), which
``--init-weights`` / ``--eval-only`` and this module read back.

    python -m cardinal.export --arch resnet50 \\
        --weights runs/resnet50-seed-cifar10-seed0/model_state.pt --output-dir exported/
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from cardinal.cli import ArgumentParser, CardinalError, positive_int, run, single_name
from cardinal.fileio import cannot_write, probe_writable, write_files_atomic
from cardinal.models import STEMS, build_model, list_archs
from cardinal.safeload import UnreadableTensors, load_tensors
from cardinal.syncbn import revert_sync_batchnorm

FORMATS = ("torchscript", "program", "state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
RUN_WEIGHTS = "model_state.pt"  # what a training run exports into its folder
RUN_CONFIG = "config.json"  # a run folder's resolved configuration (records.CONFIG_NAME)
INPUT_CONTRACT = "float RGB images in [0, 1], NCHW; the .ts/.pt2 apply (x - mean) / std inside"


@dataclass(frozen=True)
class Normalization:
    """The per-channel mean/std a model was trained with (R, G, B, of images scaled to [0, 1])."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @classmethod
    def from_values(cls, mean: Sequence[float], std: Sequence[float], source: str) -> "Normalization":
        try:
            values = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        except (TypeError, ValueError):
            raise CardinalError(f"{source} holds no valid mean/std") from None
        if (len(values[0]), len(values[1])) != (3, 3) or not all(map(math.isfinite, values[0] + values[1])) \
                or min(values[1]) <= 0:
            raise CardinalError(f"{source} holds no valid mean/std (three finite values each, std positive)")
        return cls(*values)

    def describe(self) -> str:
        shown = lambda values: " ".join(f"{v:g}" for v in values)  # noqa: E731
        return f"mean {shown(self.mean)}, std {shown(self.std)}"


class NormalizedInput(nn.Module):
    """The network behind its own normalisation: takes float RGB images in [0, 1] (NCHW)."""

    def __init__(self, model: nn.Module, normalization: Normalization) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def normalization_path(weights: os.PathLike | str) -> Path:
    """Where a state_dict file's mean/std are kept: ``<stem>.json`` beside it."""
    return Path(weights).with_suffix(".json")


def _normalization_json(weights: os.PathLike | str, normalization: Normalization) -> bytes:
    text = json.dumps({"weights": Path(weights).name, "input": INPUT_CONTRACT,
                       "mean": list(normalization.mean), "std": list(normalization.std)}, indent=2)
    return (text + "\n").encode()


def read_normalization(weights: os.PathLike | str) -> Optional[Normalization]:
    """The mean/std a weights file was trained with: its own ``<stem>.json``, else the ``config.json`` of
    the run folder it lies in; None when neither exists (a file saved by hand)."""
    weights = Path(weights)
    own, run_config = normalization_path(weights), weights.parent / RUN_CONFIG
    for path, pick in ((own, lambda data: data), (run_config, lambda data: data["recipe"])):
        if not path.is_file():
            continue
        try:
            values = pick(json.loads(path.read_text()))
            return Normalization.from_values(values["mean"], values["std"], str(path))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            raise CardinalError(f"{path} holds no valid mean/std for {weights}; restore it or remove it") from None
    return None


def resolve_weights(path: os.PathLike | str) -> Path:
    """A weights file, or a run folder (whose ``model_state.pt`` is taken)."""
    path = Path(path)
    if path.is_dir():
        if (path / RUN_WEIGHTS).is_file():
            return path / RUN_WEIGHTS
        raise CardinalError(f"{path} is a folder with no {RUN_WEIGHTS}; pass a state_dict file (a run's "
                            f"{RUN_WEIGHTS} or an exported <arch>_state.pt) or a finished run's folder")
    return path


@dataclass(frozen=True)
class ExportedFiles:
    torchscript: Optional[Path] = None
    program: Optional[Path] = None
    state_dict: Optional[Path] = None
    state_dict_normalization: Optional[Path] = None  # its mean/std (<name>_state.json)
    average_state_dict: Optional[Path] = None  # the weights' moving average (<name>_ema_state.pt)
    average_state_dict_normalization: Optional[Path] = None

    def written(self) -> Dict[str, Path]:
        return {name: path for name, path in vars(self).items() if path is not None}


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the key prefixes that DDP (``module.``) and torch.compile (``_orig_mod.``) add."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def load_state_dict_file(path: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """Read a state_dict written by ``torch.save`` (weights only: never unpickles arbitrary code)."""
    path = Path(path)
    if path.is_dir():
        raise CardinalError(f"{path} is a folder, not a weights file; pass the state_dict file in it "
                            f"(a run's {RUN_WEIGHTS}, or an exported <arch>_state.pt)")
    if not path.is_file():
        raise CardinalError(f"weights file {path} does not exist")
    try:
        state = load_tensors(path)
    except UnreadableTensors as error:
        raise CardinalError(f"cannot read weights file {path}: {error}") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise CardinalError(f"{path} does not hold a state_dict (parameter names to tensors)")
    return clean_state_dict(state)


def load_weights(model: nn.Module, path: os.PathLike | str, description: str) -> nn.Module:
    """Load a state_dict file into ``model``; a file for another architecture is one clear error."""
    try:
        model.load_state_dict(load_state_dict_file(path))
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[-1].strip()
        raise CardinalError(f"{path} does not match {description}: {detail}") from None
    return model


def _unwrapped(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _plain_eval_copy(model: nn.Module) -> nn.Module:
    """An fp32 eval-mode CPU copy without DDP / torch.compile wrappers; the caller's model is untouched."""
    return revert_sync_batchnorm(copy.deepcopy(_unwrapped(model))).float().cpu().eval()


def _deployable(model: nn.Module, normalization: Optional[Normalization]) -> nn.Module:
    """The plain copy, behind its normalisation when one is given."""
    plain = _plain_eval_copy(model)
    return plain if normalization is None else NormalizedInput(plain, normalization).eval()


def script_model(model: nn.Module, normalization: Optional[Normalization] = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        return torch.jit.script(_deployable(model, normalization))


def _serialized(save: Callable[[io.BytesIO], None]) -> bytes:
    """In memory, then written with Python: a full disk is then an OSError, where torch's own file writers
    can abort the whole process."""
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def _torchscript_bytes(model: nn.Module, normalization: Optional[Normalization]) -> bytes:
    scripted = script_model(model, normalization)

    def save(buffer: io.BytesIO) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            torch.jit.save(scripted, buffer)

    return _serialized(save)


def _program_bytes(model: nn.Module, input_size: Sequence[int], normalization: Optional[Normalization]) -> bytes:
    """A ``torch.export`` program whose batch dimension is dynamic."""
    module = _deployable(model, normalization)
    example = (torch.randn(2, *input_size),)
    program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    return _serialized(lambda buffer: torch.export.save(program, buffer))


def _state_dict_bytes(model: nn.Module) -> bytes:
    state = clean_state_dict(_plain_eval_copy(model).state_dict())
    return _serialized(lambda buffer: torch.save(state, buffer))


Files = Dict[Path, Callable[[], bytes]]  # each file of a set, and how its bytes are made


def _state_dict_files(model: nn.Module, path: Path, normalization: Optional[Normalization]) -> Files:
    """The state_dict file and, with a normalization, its mean/std beside it."""
    files: Files = {path: lambda: _state_dict_bytes(model)}
    if normalization is not None:
        files[normalization_path(path)] = lambda: _normalization_json(path, normalization)
    return files


def _write_set(files: Files, state_dicts: Sequence[Path] = ()) -> None:
    """Every file replaced together (fileio.write_files_atomic); then a state_dict written without a
    normalization loses any mean/std file of another model beside it."""
    try:
        write_files_atomic(files)
    except OSError as error:
        raise cannot_write(error.filename, error) from None
    for path in state_dicts:
        if normalization_path(path) not in files:
            normalization_path(path).unlink(missing_ok=True)


def export_torchscript(model: nn.Module, path: os.PathLike | str,
                       normalization: Optional[Normalization] = None) -> Path:
    _write_set({Path(path): lambda: _torchscript_bytes(model, normalization)})
    return Path(path)


def export_program(
    model: nn.Module, path: os.PathLike | str, input_size: Sequence[int] = (3, 32, 32),
    normalization: Optional[Normalization] = None,
) -> Path:
    """Save a ``torch.export`` program whose batch dimension is dynamic."""
    _write_set({Path(path): lambda: _program_bytes(model, input_size, normalization)})
    return Path(path)


def save_state_dict(model: nn.Module, path: os.PathLike | str,
                    normalization: Optional[Normalization] = None) -> Path:
    """A plain state_dict file; its mean/std (when given) in ``<stem>.json`` beside it, the two replaced
    together."""
    _write_set(_state_dict_files(model, Path(path), normalization), state_dicts=[Path(path)])
    return Path(path)


def export_model(
    model: nn.Module,
    output_dir: os.PathLike | str,
    name: str = "model",
    formats: Sequence[str] = FORMATS,
    input_size: Sequence[int] = (3, 32, 32),
    normalization: Optional[Normalization] = None,
    average: Optional[nn.Module] = None,
) -> ExportedFiles:
    """Write ``<name>.ts``, ``<name>.pt2`` and ``<name>_state.pt`` (as chosen) under ``output_dir``.

    Each is made from a CPU fp32 eval-mode copy; the caller's model is left untouched. With a
    ``normalization`` the .ts/.pt2 take images in [0, 1] and normalise inside, and the state_dict gets
    ``<name>_state.json`` with the mean/std; without one they take already-normalised input. An
    ``average`` (the moving average of the weights) goes beside the state_dict, with the state_dict
    format only, as ``<name>_ema_state.pt`` (and its ``.json``). Every file is written before any replaces
    an earlier one: a failed write leaves the earlier export as it was.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise CardinalError(f"unknown export format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CardinalError(f"output directory {output_dir} is a file; give a folder")
    paths = {"state_dict": output_dir / f"{name}_state.pt", "torchscript": output_dir / f"{name}.ts",
             "program": output_dir / f"{name}.pt2"}
    paths = {kind: path for kind, path in paths.items() if kind in formats}
    if average is not None and "state_dict" in paths:
        paths["average_state_dict"] = output_dir / f"{name}_ema_state.pt"
    if not paths:
        return ExportedFiles()
    probe_writable(next(iter(paths.values())))  # before the minutes torch.export can take
    state_dicts = {paths[kind]: module for kind, module in (("state_dict", model), ("average_state_dict", average))
                   if kind in paths}
    files: Files = {}
    for path, module in state_dicts.items():
        files.update(_state_dict_files(module, path, normalization))
    if "torchscript" in paths:
        files[paths["torchscript"]] = lambda: _torchscript_bytes(model, normalization)
    if "program" in paths:
        files[paths["program"]] = lambda: _program_bytes(model, input_size, normalization)
    _write_set(files, state_dicts=list(state_dicts))
    if normalization is not None:
        paths.update({f"{kind}_normalization": normalization_path(paths[kind])
                      for kind in ("state_dict", "average_state_dict") if kind in paths})
    return ExportedFiles(**paths)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cardinal.export",
        description="Export a registered architecture (random init or trained weights) as TorchScript, "
        "a torch.export program and a plain state_dict. The .ts and .pt2 take float RGB images in [0, 1] "
        "(NCHW) and normalise them inside with the weights' own mean/std; <name>_state.json beside the "
        "state_dict holds them.",
    )
    parser.add_argument("--arch", required=True, choices=list_archs(), metavar="ARCH",
                        help="architecture name")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state_dict file to load (e.g. a run's model_state.pt), or a run folder (its "
                             "model_state.pt); random init if omitted")
    parser.add_argument("--num-classes", type=positive_int, default=10, help="classifier outputs")
    parser.add_argument("--stem", choices=STEMS, default="cifar", help="stem of the network")
    parser.add_argument("--image-size", type=positive_int, default=32, help="input height and width")
    parser.add_argument("--output-dir", type=Path, default=Path("exported"), help="where files are written")
    parser.add_argument("--name", type=single_name, default=None,
                        help="file name stem, inside --output-dir (default: the arch name)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FORMAT",
                        help="what to write")
    parser.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="normalisation mean, for weights that carry none (default: the weights' own; "
                             "for weights without any, the seed recipe's)")
    parser.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="normalisation std (same rule as --mean)")
    return parser


def export_normalization(weights: Optional[Path], mean: Optional[Sequence[float]],
                         std: Optional[Sequence[float]]) -> Tuple[Normalization, str]:
    """The weights' own mean/std (a different explicit one is refused), else the flags', else the seed
    recipe's; with a note when it was not the weights' own."""
    from cardinal.config import RECIPES

    own = read_normalization(weights) if weights is not None else None
    if own is not None:
        for name, given in (("mean", mean), ("std", std)):
            if given is not None and tuple(given) != getattr(own, name):
                raise CardinalError(f"--{name} {' '.join(map(str, given))} differs from the {name} "
                                    f"{weights} was trained with ({own.describe()}); leave it out")
        return own, ""
    seed = RECIPES["seed"]
    chosen = Normalization.from_values(mean or seed.mean, std or seed.std, "--mean/--std")
    what = f"{weights} carries no normalisation" if weights is not None else "random weights"
    source = "given" if mean or std else "the seed recipe's"
    return chosen, f"{what}: the exported model normalises with {chosen.describe()} ({source})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    model = build_model(args.arch, num_classes=args.num_classes, stem=args.stem)
    weights = resolve_weights(args.weights) if args.weights is not None else None
    if weights is not None:
        load_weights(model, weights, f"{args.arch} with {args.num_classes} classes and the {args.stem} stem")
    normalization, note = export_normalization(weights, args.mean, args.std)
    if note:
        print(note)
    input_size: Tuple[int, int, int] = (3, args.image_size, args.image_size)
    files = export_model(model, args.output_dir, args.name or args.arch, args.formats, input_size, normalization)
    for kind, path in files.written().items():
        if not kind.endswith("normalization"):
            print(f"{kind}: {path}")
    if files.state_dict_normalization is not None:
        print(f"normalisation: {files.state_dict_normalization} ({normalization.describe()})")
    if files.torchscript is not None or files.program is not None:
        print(f"input of the .ts/.pt2: {INPUT_CONTRACT}")
    return 0


if __name__ == "__main__":
    run(main)
