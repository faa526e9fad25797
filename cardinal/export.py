"""Export a model as TorchScript, a ``torch.export`` program and a plain state_dict.

TorchScript (``.ts``) loads with ``torch.jit.load`` from C++ or Python without this package; recent
torch releases deprecate it, so its warning is silenced here and the README says when to prefer the
``torch.export`` program (``.pt2``), which is what new deployment paths (AOTInductor, ExecuTorch) take.

    python -m cardinal.export --arch resnet50 \\
        --weights runs/resnet50-seed-cifar10-seed0/model_state.pt --output-dir exported/
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from cardinal.cli import ArgumentParser, CardinalError, positive_int, run
from cardinal.fileio import write_bytes_atomic
from cardinal.models import STEMS, build_model, list_archs
from cardinal.syncbn import revert_sync_batchnorm

FORMATS = ("torchscript", "program", "state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class ExportedFiles:
    torchscript: Optional[Path] = None
    program: Optional[Path] = None
    state_dict: Optional[Path] = None

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
    if not path.is_file():
        raise CardinalError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a torch file
        raise CardinalError(f"cannot read weights file {path}: {str(error).splitlines()[0]}") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CardinalError(f"{path} does not hold a state_dict")
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


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        return torch.jit.script(_plain_eval_copy(model))


def _write(path: os.PathLike | str, save: Callable[[io.BytesIO], None]) -> Path:
    """Serialise in memory, then write with Python: a full disk is an OSError here, where torch's own
    file writers can abort the whole process."""
    buffer = io.BytesIO()
    save(buffer)
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as error:
        raise CardinalError(f"cannot write {path}: {error.strerror or error}") from None
    return Path(path)


def export_torchscript(model: nn.Module, path: os.PathLike | str) -> Path:
    scripted = script_model(model)

    def save(buffer: io.BytesIO) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            torch.jit.save(scripted, buffer)

    return _write(path, save)


def export_program(
    model: nn.Module, path: os.PathLike | str, input_size: Sequence[int] = (3, 32, 32)
) -> Path:
    """Save a ``torch.export`` program whose batch dimension is dynamic."""
    module = _plain_eval_copy(model)
    example = (torch.randn(2, *input_size),)
    program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    return _write(path, lambda buffer: torch.export.save(program, buffer))


def save_state_dict(model: nn.Module, path: os.PathLike | str) -> Path:
    state = clean_state_dict(_plain_eval_copy(model).state_dict())
    return _write(path, lambda buffer: torch.save(state, buffer))


def export_model(
    model: nn.Module,
    output_dir: os.PathLike | str,
    name: str = "model",
    formats: Sequence[str] = FORMATS,
    input_size: Sequence[int] = (3, 32, 32),
) -> ExportedFiles:
    """Write ``<name>.ts``, ``<name>.pt2`` and ``<name>_state.pt`` (as chosen) under ``output_dir``.

    Each is made from a CPU fp32 eval-mode copy; the caller's model is left untouched.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise CardinalError(f"unknown export format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CardinalError(f"cannot create output directory {output_dir}: {error.strerror}") from None
    if not os.access(output_dir, os.W_OK):
        raise CardinalError(f"output directory {output_dir} is not writable")
    files: Dict[str, Path] = {}
    if "state_dict" in formats:
        files["state_dict"] = save_state_dict(model, output_dir / f"{name}_state.pt")
    if "torchscript" in formats:
        files["torchscript"] = export_torchscript(model, output_dir / f"{name}.ts")
    if "program" in formats:
        files["program"] = export_program(model, output_dir / f"{name}.pt2", input_size)
    return ExportedFiles(**files)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cardinal.export",
        description="Export a registered architecture (random init or trained weights) as TorchScript, "
        "a torch.export program and a plain state_dict.",
    )
    parser.add_argument("--arch", required=True, choices=list_archs(), metavar="ARCH",
                        help=f"architecture name: {', '.join(list_archs())}")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state_dict file to load (e.g. a run's model_state.pt); random init if omitted")
    parser.add_argument("--num-classes", type=positive_int, default=10, help="classifier outputs")
    parser.add_argument("--stem", choices=STEMS, default="cifar", help="stem of the network")
    parser.add_argument("--image-size", type=positive_int, default=32, help="input height and width")
    parser.add_argument("--output-dir", type=Path, default=Path("exported"), help="where files are written")
    parser.add_argument("--name", default=None, help="file name stem (default: the arch name)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    model = build_model(args.arch, num_classes=args.num_classes, stem=args.stem)
    if args.weights is not None:
        load_weights(model, args.weights,
                     f"{args.arch} with {args.num_classes} classes and the {args.stem} stem")
    input_size: Tuple[int, int, int] = (3, args.image_size, args.image_size)
    files = export_model(model, args.output_dir, args.name or args.arch, args.formats, input_size)
    for kind, path in files.written().items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    run(main)
