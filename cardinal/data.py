"""CIFAR as one uint8 tensor on the training device, with batched augmentation and sharding.

No per-sample PIL and no worker processes: the whole split (150 MB for CIFAR-10 train) sits on the device
and each batch is a slice of a permutation, cropped and flipped as one tensor operation.

Shuffling and augmentation are drawn from a generator seeded by (seed, epoch), one draw per sample of the
split, and looked up by sample index. A sample is therefore cropped and flipped the same way whichever
process handles it, and the global batches are identical for any number of processes: a 2-process run sees
exactly what a 1-process run sees, split in two.

The official batches are pickles. They are read by an unpickler that resolves only the few names those files
contain (numpy's array reconstruction), so a planted batch cannot run code; a missing data set is downloaded
into a staging folder, md5-checked, and moved into place by one rename.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import http.client
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from cardinal.cli import CardinalError
from cardinal.fileio import folders_made_for

Split = tuple[torch.Tensor, torch.Tensor]  # images uint8 (N, 3, H, W), labels int64 (N,)


@dataclass(frozen=True)
class CifarSpec:
    folder: str
    url: str
    archive: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int


DATASETS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
    ),
}
DATASET_CHOICES = (*DATASETS, "synthetic")
IMAGE_SHAPE = (3, 32, 32)


def num_classes_of(dataset: str, synthetic_classes: int = 10) -> int:
    return synthetic_classes if dataset == "synthetic" else DATASETS[dataset].num_classes


def missing_files(folder: Path, spec: CifarSpec) -> list[str]:
    return [name for name in spec.train_files + spec.test_files if not (folder / name).is_file()]


def find_batches_dir(data_dir: Path, spec: CifarSpec) -> Path | None:
    """The extracted batch folder: ``data_dir/<folder>``, or ``data_dir`` itself if it is that folder."""
    for candidate in (data_dir / spec.folder, data_dir):
        if not missing_files(candidate, spec):
            return candidate
    return None


# --- downloading ---------------------------------------------------------------------------------------------

# network (URLError and timeouts are OSErrors), checksum, truncated or damaged archive, full disk
DOWNLOAD_ERRORS = (OSError, ValueError, EOFError, http.client.HTTPException, tarfile.TarError, zlib.error)


def download(data_dir: Path, spec: CifarSpec) -> None:
    """Fetch the official archive, check its md5, and move the extracted batch folder into ``data_dir``.

    All work happens in a hidden staging folder inside ``data_dir`` that is removed however the download ends;
    the batch folder appears by one rename once complete, so a failed or interrupted download never leaves
    anything that could later be taken for the data.
    """
    target = data_dir / spec.folder
    if target.exists():
        raise CardinalError(
            f"{target} is incomplete (missing {', '.join(missing_files(target, spec))}); complete it, or remove "
            f"it to download {spec.url} again"
        )
    try:
        with folders_made_for(data_dir):  # a failed download leaves no folder it made, parents included
            data_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".cardinal-download-", dir=data_dir) as staging:
                archive = Path(staging) / spec.archive
                fetch(spec.url, archive)
                check_md5(archive, spec.archive_md5)
                extracted = extract(archive, Path(staging) / "extracted") / spec.folder
                if missing_files(extracted, spec):
                    raise ValueError(f"the archive lacks {spec.folder}/{', '.join(missing_files(extracted, spec))}")
                move_into_place(extracted, target, spec)
    except DOWNLOAD_ERRORS as error:  # offline, proxy, checksum or disk errors all end the same way for the user
        if _cannot_write_here(error):
            raise CardinalError(f"cannot download {spec.url} into {data_dir}: {error.strerror}; free space there or "
                                "pass a --data-dir you can write to (or one holding the extracted data)") from None
        raise CardinalError(
            f"could not download {spec.url} ({_first_line(error)}); check the network, or download and extract "
            f"it by hand into {data_dir} and pass --data-dir {data_dir}"
        ) from None


def _cannot_write_here(error: BaseException) -> bool:
    """A full disk or a folder that cannot be written, as opposed to the network (URLError) or the archive."""
    local = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}
    return isinstance(error, OSError) and not isinstance(error, urllib.error.URLError) and error.errno in local


def fetch(url: str, destination: Path, timeout_s: float = 60.0) -> None:
    from torch.hub import tqdm  # tqdm when installed, torch's own minimal bar otherwise

    request = urllib.request.Request(url, headers={"User-Agent": "cardinal"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response, open(destination, "wb") as out:
        size = response.headers.get("Content-Length")
        bar = tqdm(total=int(size) if size else None, unit="B", unit_scale=True, desc=f"downloading {url}",
                   file=sys.stderr)
        with bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def check_md5(path: Path, expected: str) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"md5 of the download is {digest.hexdigest()}, expected {expected}")


def extract(archive: Path, destination: Path) -> Path:
    """Unpack a tar archive, refusing members that would land outside ``destination`` (where Python can)."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive) as tar:
        tar.extractall(destination, **safe)
    return destination


def move_into_place(extracted: Path, target: Path, spec: CifarSpec) -> None:
    """One rename; if another process (another node on shared storage) got there first, keep its copy."""
    try:
        os.rename(extracted, target)
    except OSError:
        if missing_files(target, spec):
            raise


def _first_line(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else OSError(error.reason)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- reading the batches ---------------------------------------------------------------------------------------

class RefusedGlobal(pickle.UnpicklingError):
    """A batch asked for a global the official files never contain."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What Python 3 writes for ``bytes`` at pickle protocol 2; only the latin1 form is accepted."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every name the official batches (numpy.core names) or batches re-saved by numpy 2 (numpy._core names,
    pickle protocols 2 to 5) refer to: numpy's array and scalar rebuilders, and protocol 2's byte strings."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): bytes,  # empty bytes at protocol 2
        ("builtins", "bytes"): bytes,
    }
    for package in ("numpy.core", "numpy._core"):  # the official files name numpy.core; numpy 2 writes numpy._core
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class BatchUnpickler(pickle.Unpickler):
    """Reads CIFAR batches without executing code: globals outside a short allow-list are refused."""

    ALLOWED = _allowed_globals()

    def __init__(self, handle: BinaryIO) -> None:
        super().__init__(handle, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise RefusedGlobal(_printable(f"{module}.{name}")) from None


def _printable(text: str, limit: int = 120) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


def backed_by(array: np.ndarray, file_bytes: int) -> bool:
    """Whether an unpickled array's elements can all have come from the file: contiguous, no element
    repeated by a zero or negative stride, and no more bytes than the file has. An array rebuilt by calling
    ``ndarray(shape, dtype, buffer, offset, strides)`` can otherwise claim gigabytes over a single byte."""
    return (array.flags.c_contiguous and all(stride > 0 for stride, n in zip(array.strides, array.shape) if n > 1)
            and array.nbytes <= file_bytes) or array.size == 0


def read_batch(path: Path, label_key: str, num_classes: int) -> Split:
    """One official python batch, checked by structure (the sample and the full set share no md5s)."""
    try:
        with open(path, "rb") as handle:
            file_bytes = os.fstat(handle.fileno()).st_size
            entry = BatchUnpickler(handle).load()
    except RefusedGlobal as refused:
        raise CardinalError(
            f"refusing to load CIFAR batch {path}: it references {refused.name}, which the official files "
            f"never contain"
        ) from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, ImportError, MemoryError, zlib.error) as error:
        raise CardinalError(f"cannot read CIFAR batch {path}: {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(entry, dict):
        raise CardinalError(f"corrupt CIFAR batch {path}: expected a dict, found {type(entry).__name__}")
    entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    data, labels = entry.get("data"), entry.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise CardinalError(f"corrupt CIFAR batch {path}: 'data' must be uint8 of shape (N, 3072), got {shape}")
    for name, array in (("data", data), (label_key, labels)):
        if isinstance(array, np.ndarray) and not backed_by(array, file_bytes):
            raise CardinalError(f"corrupt CIFAR batch {path}: '{name}' claims {array.nbytes} bytes in "
                                f"{array.shape} (strides {array.strides}) that the {file_bytes}-byte file does "
                                "not hold")
    labels = np.asarray(labels) if labels is not None else None
    if labels is None or labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise CardinalError(f"corrupt CIFAR batch {path}: '{label_key}' must be {len(data)} integer labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CardinalError(f"corrupt CIFAR batch {path}: labels outside 0..{num_classes - 1}")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def load_cifar(dataset: str, data_dir: Path | str, train: bool, download_missing: bool = False) -> Split:
    """A CIFAR-10/100 split as one uint8 image tensor and one label tensor, on the CPU."""
    spec = DATASETS[dataset]
    data_dir = Path(data_dir)
    batches = find_batches_dir(data_dir, spec)
    if batches is None and download_missing:
        download(data_dir, spec)
        batches = find_batches_dir(data_dir, spec)
    if batches is None:
        raise CardinalError(
            f"{dataset} not found in {data_dir} (expected {spec.folder}/ with "
            f"{', '.join(spec.train_files + spec.test_files)}); run without --no-download to fetch it, "
            f"or point --data-dir at it"
        )
    parts = [read_batch(batches / name, spec.label_key, spec.num_classes)
             for name in (spec.train_files if train else spec.test_files)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def synthetic_split(num_samples: int, num_classes: int = 10, seed: int = 0, train: bool = True) -> Split:
    """Deterministic, learnable random images: a smooth colour pattern per class plus per-image noise."""
    generator = torch.Generator().manual_seed(seed * 2 + (0 if train else 1))
    coarse = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 255
    # smooth patterns, so crops and flips keep the class recognisable as they do for real images
    prototypes = torch.nn.functional.interpolate(coarse, size=IMAGE_SHAPE[1:], mode="bilinear")
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    noise = torch.randn(num_samples, *IMAGE_SHAPE, generator=generator) * 48
    images = (0.6 * prototypes[labels] + 0.4 * 128 + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 8 + stream)


VALIDATION_STREAM = 2  # streams 0 and 1 are each epoch's shuffle and augmentation


def validation_count(val_images: float, num_samples: int) -> int:
    """``val_images`` as a number of images: a count as given, a fraction (< 1) of ``num_samples``."""
    return int(round(val_images * num_samples)) if 0 < val_images < 1 else int(val_images)


def split_validation(num_samples: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) of a split, both sorted, disjoint and covering it.

    Drawn from the seed alone on the full split, before any sharding, so every process and every number of
    processes holds out the same images.
    """
    if not 0 <= count < num_samples:
        raise CardinalError(f"cannot hold out {count} validation images of {num_samples}: "
                            "at least one must stay for training")
    order = torch.randperm(num_samples, generator=_epoch_generator(seed, 0, VALIDATION_STREAM))
    return order[count:].sort().values, order[:count].sort().values


def hold_out(images: torch.Tensor, labels: torch.Tensor, val_images: float,
             seed: int) -> tuple[Split, Split | None]:
    """(training split, validation split or None): ``val_images`` of the training images held out."""
    count = validation_count(val_images, len(labels))
    if count == 0:
        return (images, labels), None
    train, val = split_validation(len(labels), count, seed)
    return (images[train], labels[train]), (images[val], labels[val])


class Normalize:
    """uint8 images -> float, mean/std normalized, optionally channels_last."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool = False) -> None:
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = images.float().mul_(self.scale).add_(self.shift)
        return out.contiguous(memory_format=self.memory_format)


def crop_and_flip(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor,
                  padding: int) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to the original size at per-image offsets, flip where asked.

    Same result as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, for a whole batch.
    """
    n, c, h, w = images.shape
    if padding:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        rows = (dy.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1)
        padded = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
        cols = (dx.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w)
        images = padded.gather(3, cols.expand(n, c, h, w))
    return torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)


class DeviceLoader:
    """Batches of one split, resident on ``device``, sharded over processes by sample position.

    Each step takes ``global_batch`` indices of the epoch's permutation; process ``rank`` of ``world``
    gets its contiguous share of them. ``drop_last`` drops a final step smaller than the world size.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        global_batch: int,
        normalize: Normalize,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        augment: bool = False,
        crop_padding: int = 4,
        seed: int = 0,
    ) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.global_batch, self.normalize, self.device = global_batch, normalize, device
        self.rank, self.world, self.shuffle, self.augment = rank, world, shuffle, augment
        self.crop_padding, self.seed = crop_padding, seed
        self.epoch = 0
        self.limit: int | None = None

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.global_batch)
        steps = full + (1 if rest >= self.world else 0)
        return min(steps, self.limit) if self.limit is not None else steps

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_plan(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        n = len(self.labels)
        order = (torch.randperm(n, generator=_epoch_generator(self.seed, self.epoch, 0))
                 if self.shuffle else torch.arange(n))
        augmentation = None
        if self.augment:
            generator = _epoch_generator(self.seed, self.epoch, 1)
            span = 2 * self.crop_padding + 1
            dx = torch.randint(0, span, (n,), generator=generator)
            dy = torch.randint(0, span, (n,), generator=generator)
            flip = torch.rand(n, generator=generator) < 0.5
            augmentation = tuple(t.to(self.device) for t in (dx, dy, flip))
        return order.to(self.device), augmentation

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Yields (images, labels, global_count): this process's share and the step's total size."""
        order, augmentation = self._epoch_plan()
        for step in range(len(self)):
            indices = order[step * self.global_batch:(step + 1) * self.global_batch]
            share = torch.tensor_split(indices, self.world)[self.rank]
            images = self.images[share]
            if augmentation is not None:
                dx, dy, flip = (t[share] for t in augmentation)
                images = crop_and_flip(images, dx, dy, flip, self.crop_padding)
            yield self.normalize(images), self.labels[share], len(indices)


def shard_for_eval(num_samples: int, rank: int, world: int) -> torch.Tensor:
    """Contiguous, disjoint, covering shards: every test image is evaluated exactly once."""
    return torch.tensor_split(torch.arange(num_samples), world)[rank]


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch: int, normalize: Normalize,
                 rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    share = shard_for_eval(len(labels), rank, world).to(images.device)
    for start in range(0, len(share), batch):
        chunk = share[start:start + batch]
        yield normalize(images[chunk]), labels[chunk]


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.cpu(), minlength=num_classes).tolist()
