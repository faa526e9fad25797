"""A small generated CIFAR-10 in the official python layout, so data tests need no download and no sample.

``write_cifar10(root)`` writes ``root/cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch`` and
``batches.meta``: 5 x 60 training and 100 test images, every class equally often in every batch. Images are a
smooth colour pattern per class plus per-image noise, so a model can learn them, and everything is a pure
function of the seed.

The batches are written as the official files were: protocol-2 pickles made by Python 2, whose byte strings
are plain ``STRING`` opcodes and whose arrays name ``numpy.core.multiarray._reconstruct``. Python 3's pickle
would write ``_codecs.encode`` calls and ``numpy._core`` instead, and the reader would then be tested against
a format the real files never use.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

FOLDER = "cifar-10-batches-py"
LABEL_NAMES = (b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
               b"truck")
NUM_CLASSES = len(LABEL_NAMES)
TRAIN_BATCHES = 5
TRAIN_PER_BATCH = 60
TRAIN_SIZE = TRAIN_BATCHES * TRAIN_PER_BATCH
TEST_SIZE = 100
# every global an official batch refers to (checked against the real files by a sample test)
OFFICIAL_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy keeps it


class Python2StylePickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it for the official batches (see the module docstring)."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_python2_string(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_string

    def save_global(self, obj, name=None) -> None:
        if obj is _RECONSTRUCT:  # under the name the official files use
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def python2_style_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    Python2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def class_patterns(seed: int = 0) -> np.ndarray:
    """One smooth 3 x 32 x 32 colour pattern per class (values 0..255): crops and flips keep the class visible."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (NUM_CLASSES, 3, 4, 4)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(32, 32), mode="bilinear")
    return smooth.numpy()


def make_batch(count: int, batch_label: bytes, seed: int, patterns: np.ndarray) -> dict:
    """One batch dict with the official keys: balanced shuffled labels, images as uint8 rows of R, G, B planes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % NUM_CLASSES
    rng.shuffle(labels)
    noise = rng.normal(0, 40, (count, 3, 32, 32))
    images = np.clip(np.round(0.6 * patterns[labels] + 0.4 * 128 + noise), 0, 255).astype(np.uint8)
    return {
        b"batch_label": batch_label,
        b"labels": [int(label) for label in labels],
        b"data": images.reshape(count, 3 * 32 * 32),
        b"filenames": [b"%s_s_%06d.png" % (LABEL_NAMES[label], seed * 10_000 + i) for i, label in enumerate(labels)],
    }


def cifar10_batches(seed: int = 0) -> dict[str, dict]:
    """File name -> batch dict (``batches.meta`` included), exactly what ``write_cifar10`` writes."""
    patterns = class_patterns(seed)
    batches = {
        f"data_batch_{i}": make_batch(TRAIN_PER_BATCH, b"training batch %d of %d" % (i, TRAIN_BATCHES),
                                      seed * 100 + i, patterns)
        for i in range(1, TRAIN_BATCHES + 1)
    }
    batches["test_batch"] = make_batch(TEST_SIZE, b"testing batch 1 of 1", seed * 100, patterns)
    batches["batches.meta"] = {b"num_cases_per_batch": TRAIN_PER_BATCH, b"label_names": list(LABEL_NAMES),
                               b"num_vis": 3 * 32 * 32}
    return batches


def write_cifar10(root: Path, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` and return ``root`` (what ``--data-dir`` takes)."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in cifar10_batches(seed).items():
        (folder / name).write_bytes(python2_style_pickle(entry))
    return Path(root)
