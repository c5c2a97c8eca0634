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


# ----------------------------------------------------------------------------------------- timm's pipeline

def _folders(root, n: int = 6, size: tuple[int, int] = (300, 260), classes: tuple[str, ...] = ("cat", "dog")):
    """A tiny ImageFolder of seeded random RGB PNGs (non-square, so that resize and crop matter)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_evaluation_transform_is_exactly_timms(tmp_path):
    """DeiT-S's test images go through timm's own transform of its pretrained configuration (bicubic, crop 0.9:
    resize 248, centre crop 224), not a hand-written one."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    root = _folders(tmp_path)
    dm = ImageFolderDataModule(data_dir=str(root), img_size=224, val_size=2, num_workers=0, batch_size=4,
                               model_name="deit_small_patch16_224")
    dm.setup()
    reference = create_transform(**resolve_data_config({}, model=timm.create_model("deit_small_patch16_224")))
    path, _ = dm.test_set.samples[3]
    expected = reference(Image.open(path).convert("RGB"))
    assert torch.equal(dm.test_set[3][0], expected)
    assert dm.data_config["interpolation"] == "bicubic" and dm.data_config["crop_pct"] == 0.9
    assert dm.describe()["eval_transform"]["crop_pct"] == 0.9  # part of every row's configuration


def test_imagefolder_trains_with_deits_recipe_and_soft_targets(tmp_path):
    root = _folders(tmp_path)
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, val_size=2, num_workers=0, batch_size=4)
    dm.setup()
    names = repr(dm.train_set.dataset.transform)
    assert "RandAugment" in names and "RandomErasing" in names and "RandomResizedCrop" in names
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 10 training images, batch 4: the incomplete last batch is dropped
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 2) and y.dtype == torch.float32
    assert torch.allclose(y.sum(-1), torch.ones(4)) and bool((y >= 0.05 - 1e-6).all())  # smoothing 0.1 over 2
    x, y = next(iter(dm.test_dataloader()))  # evaluation: hard labels
    assert y.dtype == torch.int64 and y.ndim == 1


def test_imagefolder_augmentation_settings_and_no_augment(tmp_path):
    from datamodules.imagefolder import MixupCollate

    root = _folders(tmp_path)
    plain = ImageFolderDataModule(data_dir=str(root), img_size=32, val_size=2, num_workers=0, batch_size=4,
                                  augment=False)
    plain.setup()
    assert plain.mixup_fn is None and plain.train_set.dataset.transform is not None
    x, y = next(iter(plain.train_dataloader()))
    assert y.dtype == torch.int64  # no mixup without augmentation
    no_mix = ImageFolderDataModule(data_dir=str(root), img_size=32, val_size=2, num_workers=0, batch_size=4,
                                   augmentation={"mixup": 0.0, "cutmix": 0.0, "auto_augment": None})
    no_mix.setup()
    assert no_mix.mixup_fn is None and "RandAugment" not in repr(no_mix.train_set.dataset.transform)
    with pytest.raises(DataError, match="unknown augmentation setting.*mixupp"):
        ImageFolderDataModule(data_dir=str(root), augmentation={"mixupp": 0.5})
    dm = ImageFolderDataModule(data_dir=str(root), img_size=32, val_size=2, num_workers=0, batch_size=3)
    dm.setup()
    collate = MixupCollate(dm.mixup_fn, 2, 0.1)  # an odd batch: smoothed one-hot, unmixed
    samples = [(torch.full((3, 4, 4), float(i)), i % 2) for i in range(3)]
    x, y = collate(samples)
    assert torch.equal(x[:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(y, torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.95, 0.05]]))


def test_soft_targets_train_with_soft_target_cross_entropy():
    from bench_suite.registry import get_method
    from tests.conftest import random_images, tiny_vit

    module = get_method("full").factory(tiny_vit(), label_smoothing=0.1)
    x = random_images(4)
    y = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), -1)
    with torch.no_grad():
        out = module.forward_train(x)
        ce = float(module.losses(out, None, (x, y))["ce"])
    assert ce == pytest.approx(float(-(y * torch.log_softmax(out.logits, -1)).sum(-1).mean()), rel=1e-6)


def test_val_size_num_workers_and_augmentation_from_the_command_line(tmp_path):
    from types import SimpleNamespace

    from bench_suite.errors import UserError
    from bench_suite.plan import make_datamodule

    root = _folders(tmp_path)
    cfg = SimpleNamespace(profile="deit_s", data="imagenet", data_dir=str(root), num_workers=None, val_size=3,
                          augmentation='{"re_prob": 0.5}')
    dm = make_datamodule(cfg)
    assert dm.val_size == 3 and dm.num_workers >= 1 and dm.augmentation["re_prob"] == 0.5
    assert dm.model_name == "deit_small_patch16_224" and dm.augmentation["mixup"] == 0.8
    fm = make_datamodule(SimpleNamespace(profile="mini", data="fashion_mnist", data_dir=None, num_workers=None,
                                         val_size=1000, augmentation=None))
    assert fm.val_size == 1000 and fm.num_workers == 0
    for bad, match in (('{"mixup": 0}', "ImageFolder data, not of --data fashion_mnist"), ("[1]", "JSON object"),
                       ("{mixup", "not valid JSON")):
        with pytest.raises(UserError, match=match) as info:
            make_datamodule(SimpleNamespace(profile="mini", data="fashion_mnist", data_dir=None, num_workers=None,
                                            val_size=None, augmentation=bad))
        assert "\n" not in str(info.value)
