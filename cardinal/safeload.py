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
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True``; UnreadableTensors says why not
    (an unreadable file included)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(ZIP_START))
    except OSError as error:
        raise UnreadableTensors(error.strerror or str(error)) from None
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
        return _archive_problem(path)
    if start.startswith(PICKLE_START):
        return ""
    return "it is not a file written by torch.save"


def _archive_problem(path: Path) -> str:
    """Saved models are zip archives too: TorchScript keeps its code (``code/``), torch.export its program
    (``models/``, ``archive_format``) beside the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return ""  # torch.load says what is wrong with it
    if any("/code/" in name or name.endswith("/constants.pkl") for name in names):
        return "it is a TorchScript model, not a state_dict (load it with torch.jit.load)"
    if any(name.endswith(("/archive_format", "/models/model.json")) for name in names):
        return "it is a torch.export program, not a state_dict (load it with torch.export.load)"
    return ""


def _load_problem(error: Exception) -> str:
    """torch opens every refusal of its restricted unpickler with a paragraph that advises loading unsafely;
    the paragraph after it tells objects (a GLOBAL it will not import) from damage."""
    paragraphs = [part.strip() for part in str(error).split("\n\n") if part.strip()]
    if paragraphs and paragraphs[0].startswith("Weights only load failed"):
        if any("global" in part.lower() for part in paragraphs[1:2]):
            return "it holds Python objects besides tensors, which cardinal never unpickles (they could run code)"
        paragraphs = paragraphs[1:]
    detail = paragraphs[0].splitlines()[0] if paragraphs else type(error).__name__
    return f"it is damaged, or was not written by torch.save ({detail})"
