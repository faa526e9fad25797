"""Reading CIFAR (generated in the official layout, and the real sample where present), downloading it, and the
device loader."""

import codecs
import hashlib
import io
import os
import pickle
import pickletools
import shutil
import tarfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cardinal import data
from cardinal.cli import CardinalError
from cardinal.data import (
    DATASETS,
    BatchUnpickler,
    DeviceLoader,
    Normalize,
    crop_and_flip,
    eval_batches,
    load_cifar,
    read_batch,
    synthetic_split,
)

from cifar_fixture import (
    FOLDER,
    NUM_CLASSES,
    OFFICIAL_GLOBALS,
    TEST_SIZE,
    TRAIN_SIZE,
    cifar10_batches,
    python2_style_pickle,
)
from conftest import TINY, cli

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _message(error_info) -> str:
    """The CardinalError's text, which must be one line."""
    message = str(error_info.value)
    assert len(message.splitlines()) == 1, message
    return message


def _globals_in(raw: bytes) -> set:
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}


# --- reading the generated CIFAR-10 ------------------------------------------------------------------------------

def test_generated_cifar_loads_with_its_documented_counts(cifar_dir):
    images, labels = load_cifar("cifar10", cifar_dir, train=True)
    assert images.shape == (TRAIN_SIZE, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=NUM_CLASSES).tolist() == [TRAIN_SIZE // NUM_CLASSES] * NUM_CLASSES
    test_images, test_labels = load_cifar("cifar10", cifar_dir / FOLDER, train=False)
    assert test_images.shape == (TEST_SIZE, 3, 32, 32)
    assert torch.bincount(test_labels, minlength=NUM_CLASSES).tolist() == [TEST_SIZE // NUM_CLASSES] * NUM_CLASSES


def test_generated_cifar_round_trips_exactly(cifar_dir):
    batches = cifar10_batches()
    for train, names in ((True, TRAIN_FILES), (False, ["test_batch"])):
        images, labels = load_cifar("cifar10", cifar_dir, train=train)
        expected = np.concatenate([batches[name][b"data"] for name in names]).reshape(-1, 3, 32, 32)
        assert np.array_equal(images.numpy(), expected)
        assert labels.tolist() == [label for name in names for label in batches[name][b"labels"]]


def test_generated_files_are_deterministic_and_shaped_like_the_official_ones(cifar_dir):
    for name, entry in cifar10_batches().items():
        raw = (cifar_dir / FOLDER / name).read_bytes()
        assert raw == python2_style_pickle(entry)
        assert raw[:2] == b"\x80\x02" and _globals_in(raw) <= OFFICIAL_GLOBALS
    first = pickle.loads((cifar_dir / FOLDER / "data_batch_1").read_bytes(), encoding="bytes")
    assert sorted(first) == [b"batch_label", b"data", b"filenames", b"labels"]
    assert all(isinstance(name, bytes) for name in first[b"filenames"])


@pytest.mark.parametrize("labels_as", ["ints", "numpy scalars", "array"])
@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_batches_saved_by_this_numpy_read_back_exactly(tmp_path, protocol, labels_as):
    entry = dict(cifar10_batches()["test_batch"])
    labels = np.array(entry[b"labels"], dtype=np.int64)
    entry[b"labels"] = {"ints": labels.tolist(), "numpy scalars": list(labels), "array": labels}[labels_as]
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    images, read_labels = read_batch(path, "labels", NUM_CLASSES)
    assert np.array_equal(images.numpy().reshape(-1, 3072), entry[b"data"])
    assert read_labels.tolist() == labels.tolist()


def test_truncated_file_error_names_the_file(tmp_path, cifar_dir):
    broken = tmp_path / "data_batch_1"
    broken.write_bytes((cifar_dir / FOLDER / "data_batch_1").read_bytes()[:-100])
    with pytest.raises(CardinalError, match="data_batch_1") as error:
        read_batch(broken, "labels", 10)
    _message(error)


# --- the real sample (deselected where it is absent) -------------------------------------------------------------

@pytest.mark.sample
def test_sample_loads_with_the_documented_counts(sample_dir):
    images, labels = load_cifar("cifar10", sample_dir, train=True)
    assert images.shape == (4660, 3, 32, 32) and images.dtype == torch.uint8
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 435 and counts.max() <= 489
    test_images, _ = load_cifar("cifar10", sample_dir / FOLDER, train=False)
    assert len(test_images) == 846


@pytest.mark.sample
def test_sample_reads_as_plain_pickle_would_and_needs_only_the_allowed_names(sample_dir):
    for path in sorted((sample_dir / FOLDER).iterdir()):
        raw = path.read_bytes()
        assert _globals_in(raw) <= OFFICIAL_GLOBALS, path.name  # what the generated files reproduce
        restricted = BatchUnpickler(io.BytesIO(raw)).load()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 2 warns about the numpy.core name
            trusted = pickle.loads(raw, encoding="bytes")
        assert restricted.keys() == trusted.keys(), path.name
        for key, value in trusted.items():
            same = np.array_equal(restricted[key], value) if isinstance(value, np.ndarray) else restricted[key] == value
            assert same, (path.name, key)


# --- batches that would run code ---------------------------------------------------------------------------------

class _Call:
    """Pickles as a call of ``function(*args)``: what a planted batch runs when it is unpickled."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _trapped_batch(call: _Call, protocol: int = 2) -> bytes:
    entry = dict(cifar10_batches()["data_batch_1"])
    entry[b"data"] = call
    return pickle.dumps(entry, protocol=protocol)


TRAPS = {  # id: (the call, given the marker file it creates; pickle protocol; the global the reader refuses)
    "os.system": (lambda marker: _Call(os.system, f"touch '{marker}'"), 2, "posix.system"),
    "exec": (lambda marker: _Call(exec, f"open({str(marker)!r}, 'w').close()"), 4, "builtins.exec"),
    "Path.touch": (lambda marker: _Call(Path.touch, marker), 2, "__builtin__.getattr"),
}


@pytest.mark.parametrize("trap", TRAPS)
def test_a_batch_that_would_run_code_is_refused_before_it_runs(tmp_path, trap):
    make_call, protocol, refused = TRAPS[trap]
    marker = tmp_path / "code-ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(_trapped_batch(make_call(marker), protocol))
    with pytest.raises(CardinalError) as error:
        read_batch(path, "labels", 10)
    assert _message(error) == (f"refusing to load CIFAR batch {path}: it references {refused}, which the official "
                               f"files never contain")
    assert not marker.exists()
    pickle.loads(path.read_bytes(), encoding="bytes")  # the same file through plain pickle does run the code
    assert marker.exists()


def test_byte_strings_are_decoded_only_as_latin1(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(_trapped_batch(_Call(codecs.encode, "text", "rot13")))
    with pytest.raises(CardinalError, match="refusing .* _codecs.encode with encoding 'rot13'") as error:
        read_batch(path, "labels", 10)
    _message(error)


class _StridedArray:
    """Pickles as ``ndarray(shape, dtype, buffer, 0, strides)``: with zero strides, a few bytes pose as millions."""

    def __init__(self, shape, dtype, buffer, strides):
        self.args = (shape, np.dtype(dtype), buffer, 0, strides)

    def __reduce__(self):
        return np.ndarray, self.args


@pytest.mark.parametrize("images, labels", [
    (_StridedArray((300_000, 3072), np.uint8, b"\0", (0, 0)), _StridedArray((300_000,), np.int64, b"\0" * 8, (0,))),
    (_StridedArray((4, 3072), np.uint8, b"\0" * 3072, (0, 1)), [0, 1, 2, 3]),  # one image shown four times
    (np.zeros((2, 3072), np.uint8), _StridedArray((2,), np.int64, b"\0" * 8, (0,))),
])
def test_arrays_not_backed_by_the_files_bytes_are_refused(tmp_path, images, labels):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": images, b"labels": labels}, protocol=2))
    assert pickle.loads(path.read_bytes(), encoding="bytes")[b"data"].shape[1] == 3072  # numpy itself accepts it
    with pytest.raises(CardinalError, match="that the .*-byte file does not hold") as error:
        read_batch(path, "labels", 10)
    assert str(path) in _message(error)


@pytest.mark.slow
def test_a_trapped_folder_stops_the_training_cli_with_one_line(cifar_copy, tmp_path):
    marker = tmp_path / "code-ran"
    batch = cifar_copy / FOLDER / "data_batch_3"
    batch.write_bytes(_trapped_batch(_Call(os.system, f"touch '{marker}'")))
    done = cli("cardinal.train", [*TINY, "--data-dir", str(cifar_copy), "--output-dir", str(tmp_path / "out")])
    assert done.returncode == 2, done.stderr
    expected = (f"error: refusing to load CIFAR batch {batch}: it references posix.system, which the official "
                f"files never contain")
    assert done.stderr.splitlines() == [expected], done.stderr
    assert not marker.exists()


# --- missing data and downloading --------------------------------------------------------------------------------

def _serve(monkeypatch, url: str, md5: str = "0" * 32) -> None:
    """Point the cifar10 download at ``url`` (a file:// archive, or an address nothing answers)."""
    monkeypatch.setitem(DATASETS, "cifar10", replace(DATASETS["cifar10"], url=url, archive_md5=md5))


def _archive(source: Path, destination: Path, leave_out: tuple = ()) -> Path:
    """A tar.gz laid out like the official one, built from a CIFAR-10 folder."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(destination, "w:gz") as tar:
        for path in sorted((source / FOLDER).iterdir()):
            if path.name not in leave_out:
                tar.add(path, arcname=f"{FOLDER}/{path.name}")
    return destination


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _left_in(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_missing_data_without_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "fetch", lambda *args: pytest.fail("downloaded although asked not to"))
    with pytest.raises(CardinalError) as error:
        load_cifar("cifar100", tmp_path, train=True)
    message = _message(error)
    assert f"not found in {tmp_path}" in message and "cifar-100-python/" in message
    assert "run without --no-download" in message and "--data-dir" in message


def test_download_fetches_verifies_and_moves_the_folder_into_place(cifar_dir, tmp_path, monkeypatch):
    archive = _archive(cifar_dir, tmp_path / "served" / "cifar-10-python.tar.gz")
    _serve(monkeypatch, archive.as_uri(), _md5(archive))
    data_dir = tmp_path / "data"
    images, labels = load_cifar("cifar10", data_dir, train=True, download_missing=True)
    expected_images, expected_labels = load_cifar("cifar10", cifar_dir, train=True)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert _left_in(data_dir) == [FOLDER]  # no archive, no staging folder
    monkeypatch.setattr(data, "fetch", lambda *args: pytest.fail("downloaded again"))
    assert torch.equal(load_cifar("cifar10", data_dir, train=False, download_missing=True)[1],
                       load_cifar("cifar10", cifar_dir, train=False)[1])


def _unreachable(cifar_dir, served):
    return "http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32, ""


def _wrong_md5(cifar_dir, served):
    return _archive(cifar_dir, served).as_uri(), "0" * 32, "md5"


def _truncated_archive(cifar_dir, served):
    archive = _archive(cifar_dir, served)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])  # some members extract
    return archive.as_uri(), _md5(archive), ""


def _archive_without_a_batch(cifar_dir, served):
    archive = _archive(cifar_dir, served, leave_out=("data_batch_4",))
    return archive.as_uri(), _md5(archive), "lacks cifar-10-batches-py/data_batch_4"


@pytest.mark.parametrize("failure", [_unreachable, _wrong_md5, _truncated_archive, _archive_without_a_batch],
                         ids=lambda failure: failure.__name__.strip("_"))
def test_a_failed_download_is_one_line_and_leaves_nothing_behind(cifar_dir, tmp_path, monkeypatch, failure):
    url, md5, reason = failure(cifar_dir, tmp_path / "served" / "cifar-10-python.tar.gz")
    _serve(monkeypatch, url, md5)
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(CardinalError) as error:
        load_cifar("cifar10", data_dir, train=True, download_missing=True)
    message = _message(error)
    assert message.startswith(f"could not download {url} (") and reason in message
    assert f"download and extract it by hand into {data_dir} and pass --data-dir {data_dir}" in message
    assert not (tmp_path / "new").exists()  # the folders it created for the download are gone too


def test_a_failed_download_keeps_an_existing_folder_and_what_it_held(tmp_path, monkeypatch):
    _serve(monkeypatch, "http://127.0.0.1:9/cifar-10-python.tar.gz")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CardinalError, match="could not download"):
        load_cifar("cifar10", tmp_path, train=True, download_missing=True)
    assert _left_in(tmp_path) == ["notes.txt"]


def test_an_interrupted_download_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(url, destination, **kwargs):
        destination.write_bytes(b"half an archive")
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "fetch", interrupted)
    data_dir = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        load_cifar("cifar10", data_dir, train=True, download_missing=True)
    assert not data_dir.exists()


def test_a_copy_placed_meanwhile_by_another_process_is_kept(cifar_dir, tmp_path, monkeypatch):
    archive = _archive(cifar_dir, tmp_path / "served" / "cifar-10-python.tar.gz")
    _serve(monkeypatch, archive.as_uri(), _md5(archive))
    data_dir = tmp_path / "data"
    extract = data.extract

    def extract_while_another_process_finishes(*args):
        shutil.copytree(cifar_dir / FOLDER, data_dir / FOLDER)
        return extract(*args)
    monkeypatch.setattr(data, "extract", extract_while_another_process_finishes)
    assert len(load_cifar("cifar10", data_dir, train=True, download_missing=True)[1]) == TRAIN_SIZE
    assert _left_in(data_dir) == [FOLDER]


def test_an_incomplete_folder_is_reported_not_replaced(cifar_copy, monkeypatch):
    (cifar_copy / FOLDER / "data_batch_4").unlink()
    monkeypatch.setattr(data, "fetch", lambda *args: pytest.fail("downloaded over an existing folder"))
    with pytest.raises(CardinalError) as error:
        load_cifar("cifar10", cifar_copy, train=True, download_missing=True)
    assert "incomplete (missing data_batch_4)" in _message(error)
    assert _left_in(cifar_copy / FOLDER) == sorted(set(cifar10_batches()) - {"data_batch_4"})


# --- synthetic data and the device loader ------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_split_specific():
    a, b = synthetic_split(64, seed=3), synthetic_split(64, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(synthetic_split(64, seed=3, train=False)[0], a[0])


def test_crop_and_flip_matches_pad_then_slice():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    dx, dy = torch.tensor([0, 8, 3, 4, 1]), torch.tensor([8, 0, 5, 4, 2])
    flip = torch.tensor([False, True, True, False, False])
    out = crop_and_flip(images, dx, dy, flip, padding=4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(5):
        expected = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], expected.flip(2) if flip[i] else expected)


def _batches(world, rank, augment=True, epoch=1):
    images, labels = synthetic_split(200, seed=0)
    loader = DeviceLoader(images, labels, 64, Normalize((0.5,) * 3, (0.25,) * 3, torch.device("cpu")),
                          torch.device("cpu"), rank, world, augment=augment, seed=7)
    loader.set_epoch(epoch)
    return list(loader)


def test_global_batches_do_not_depend_on_the_number_of_processes():
    single = _batches(1, 0)
    halves = [_batches(2, 0), _batches(2, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) == 4  # 64, 64, 64, 8
    for step, (images, labels, count) in enumerate(single):
        joined = torch.cat([halves[0][step][0], halves[1][step][0]])
        assert torch.equal(joined, images) and count == halves[0][step][2]
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), labels)


def test_epochs_reshuffle_and_reaugment():
    first, second = _batches(1, 0, epoch=1), _batches(1, 0, epoch=2)
    assert not torch.equal(first[0][1], second[0][1])
    assert torch.equal(_batches(1, 0, epoch=1)[0][0], first[0][0])


def test_eval_shards_cover_every_image_once():
    images, labels = torch.zeros(103, 3, 32, 32, dtype=torch.uint8), torch.arange(103)
    normalize = Normalize((0,) * 3, (1,) * 3, torch.device("cpu"))
    seen = torch.cat([y for rank in range(3) for _, y in eval_batches(images, labels, 10, normalize, rank, 3)])
    assert sorted(seen.tolist()) == list(range(103))


def test_normalize_and_channels_last():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = Normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0), torch.device("cpu"), channels_last=True)(images)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
