"""Datamodules: the real Fashion-MNIST files, the search order, and clear errors for bad files."""
from __future__ import annotations

import gzip

import pytest
import torch

from datamodules import DataError, FashionMNISTDataModule, ImageFolderDataModule, create_datamodule
from datamodules.fashion_mnist import locate, read_idx, synthetic_idx_dir
from tests.conftest import have_fashion_mnist

real = pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")


@real
def test_real_fashion_mnist_splits_and_batches():
    dm = FashionMNISTDataModule(val_size=5000, train_subset=1000, batch_size=32, augment=False)
    dm.setup()
    assert len(dm.train_set) == 1000 and len(dm.val_set) == 5000 and len(dm.test_set) == 10000
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(dm.test_set.labels.tolist()) == set(range(10))
    # normalised with the training-set statistics: roughly zero mean, unit std over the test set
    xs = torch.stack([dm.test_set[i][0] for i in range(0, 10000, 10)])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


@real
def test_validation_split_is_fixed_and_disjoint_from_training():
    a, b = FashionMNISTDataModule(augment=False), FashionMNISTDataModule(augment=False)
    a.setup(), b.setup()
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert torch.equal(a.val_idx, b.val_idx)
    assert not set(a.val_idx.tolist()) & set(a.train_idx.tolist())
    assert len(a.train_set) + len(a.val_set) == 60000


@real
def test_resize_and_channels_for_paper_backbones():
    dm = FashionMNISTDataModule(img_size=224, in_chans=3, val_size=10, train_subset=4, augment=False)
    x, _ = dm.sample_batch(2)
    assert x.shape == (2, 3, 224, 224)
    assert torch.equal(x[:, 0], x[:, 1])


def test_data_dir_is_searched_first(tmp_path):
    d = synthetic_idx_dir(tmp_path / "fm", n_train=40, n_test=20)
    dm = FashionMNISTDataModule(data_dir=str(d), val_size=10, download=False)
    dm.setup()
    assert len(dm.train_set) == 30 and len(dm.test_set) == 20
    assert dm.paths["test_images"].parent == d


def test_gzipped_files_and_torchvision_layout(tmp_path):
    src = synthetic_idx_dir(tmp_path / "plain", n_train=20, n_test=10)
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in src.iterdir():
        (raw / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    paths = locate(tmp_path / "tv", download=False)
    assert read_idx(paths["train_images"]).shape == (20, 28, 28)


def test_truncated_idx_file_names_the_file(tmp_path):
    d = synthetic_idx_dir(tmp_path, n_train=20, n_test=10)
    bad = d / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        FashionMNISTDataModule(data_dir=str(d), val_size=5, download=False).setup()


def test_corrupt_gzip_and_bad_magic_name_the_file(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="x.gz"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "y").write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "y")


def test_partial_data_dir_says_what_is_missing(tmp_path):
    d = synthetic_idx_dir(tmp_path, n_train=20, n_test=10)
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing: t10k-labels-idx1-ubyte"):
        locate(d, download=False)


def test_nothing_found_gives_one_line_how_to(tmp_path, monkeypatch):
    import datamodules.fashion_mnist as fm

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(DataError) as info:
        locate(tmp_path / "empty", download=False)
    assert "apt-get install dataset-fashion-mnist" in str(info.value) and "\n" not in str(info.value)


def test_imagefolder_errors_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        ImageFolderDataModule(data_dir=None).setup()
    with pytest.raises(DataError, match="train"):
        ImageFolderDataModule(data_dir=str(tmp_path)).setup()
    with pytest.raises(DataError, match="known datasets"):
        create_datamodule("cifar")


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), img_size=32, val_size=2, num_workers=0, batch_size=4)
    dm.setup()
    assert dm.num_classes == 2 and len(dm.train_set) == 10 and len(dm.test_set) == 12
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
