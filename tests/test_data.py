import pytest
import torch

from cardinal.cli import CardinalError
from cardinal.data import (DeviceLoader, Normalize, crop_and_flip, eval_batches, load_cifar, read_batch,
                           synthetic_split)


def test_sample_loads_with_the_documented_counts(sample_dir):
    images, labels = load_cifar("cifar10", sample_dir, train=True)
    assert images.shape == (4660, 3, 32, 32) and images.dtype == torch.uint8
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 435 and counts.max() <= 489
    test_images, _ = load_cifar("cifar10", sample_dir / "cifar-10-batches-py", train=False)
    assert len(test_images) == 846


def test_truncated_file_error_names_the_file(tmp_path, sample_dir):
    broken = tmp_path / "data_batch_1"
    broken.write_bytes((sample_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes()[:-100])
    with pytest.raises(CardinalError, match="data_batch_1"):
        read_batch(broken, "labels", 10)


def test_missing_data_without_download_says_what_to_do(tmp_path):
    with pytest.raises(CardinalError, match="--download"):
        load_cifar("cifar100", tmp_path, train=True)


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as utils

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    with pytest.raises(CardinalError, match="could not download .*Network is unreachable"):
        load_cifar("cifar10", tmp_path, train=True, download_missing=True)


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
