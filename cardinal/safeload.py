"""The one way cardinal reads a file written by ``torch.save``: tensors and plain containers only.

``weights_only=True`` means a file can never run code while it loads. What goes wrong is said in the user's
terms (an empty file, a TorchScript archive, a pickle of other objects) instead of torch's, whose advice
for the last case is to load it unsafely, and torch's warnings about such files stay out of the output.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

PICKLE_START = b"\x80"  # every pickle protocol torch.save has written starts with the PROTO opcode
ZIP_START = b"PK\x03\x04"


class UnreadableTensors(ValueError):
    """A file that ``torch.save`` did not write, or that holds more than tensors; its message is the reason."""


def load_tensors(path: os.PathLike | str, map_location: Any = "cpu") -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True``; UnreadableTensors says why not.
    OSError (a missing or unreadable file) passes through for the caller to word."""
    path = Path(path)
    with open(path, "rb") as handle:
        start = handle.read(len(ZIP_START))
    problem = _format_problem(path, start)
    if problem:
        raise UnreadableTensors(problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # damaged, cut short, or objects other than tensors
        raise UnreadableTensors(_load_problem(error)) from None


def _format_problem(path: Path, start: bytes) -> str:
    if not start:
        return "the file is empty"
    if start == ZIP_START:
        return "it is a TorchScript model, not a state_dict (load it with torch.jit.load)" if _torchscript(path) else ""
    if start.startswith(PICKLE_START):
        return ""
    return "it is not a file written by torch.save"


def _torchscript(path: Path) -> bool:
    """TorchScript archives keep the model's code (``code/``) and constants beside the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


def _load_problem(error: Exception) -> str:
    text = str(error).strip()
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds Python objects besides tensors, which cardinal never unpickles (they could run code)"
    first = text.splitlines()[0] if text else type(error).__name__
    return f"it is damaged or cut short ({first})"
