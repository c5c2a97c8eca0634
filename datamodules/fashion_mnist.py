"""Fashion-MNIST as a LightningDataModule, read from the original IDX files.

Where the data is looked for, in order:

1. ``data_dir`` (the ``--data-dir`` option), holding the four IDX files, gzipped or not, either
   directly or in a ``FashionMNIST/raw`` subfolder (torchvision's layout);
2. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
3. torchvision's download into ``data_dir`` (or ``~/.cache/bench_suite/data``), where the network
   allows it.

The validation split is a fixed, seeded subset of the 60k training images; reported test accuracy is
on the official 10k test set.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import SplitDataModule
from bench_suite.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("BENCH_SUITE_CACHE", Path.home() / ".cache" / "bench_suite")) / "data"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET = (
    "Fashion-MNIST not found: pass --data-dir with the four IDX files, or run "
    "'apt-get install dataset-fashion-mnist' (Debian), or allow the network for torchvision's download"
)
# Per-pixel statistics of the Fashion-MNIST training set (computed from the IDX files, pixels / 255).
MEAN, STD = 0.2860, 0.3530
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array.

    Raises:
        DataError: if the file is truncated, corrupt or not an IDX file; the message names the file.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header incomplete)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for name in (stem, stem + ".gz"):
            p = directory / sub / name
            if p.is_file():
                return p
    return None


def locate(data_dir: str | Path | None = None, download: bool = True) -> dict[str, Path]:
    """Find the four Fashion-MNIST IDX files (see the module docstring for the search order).

    Returns:
        Mapping of ``train_images``, ``train_labels``, ``test_images``, ``test_labels`` to paths.

    Raises:
        DataError: with a one-line explanation of how to get the data when nothing is found, or
            naming the folder when ``data_dir`` holds only some of the files.
    """
    candidates = [Path(data_dir)] if data_dir else []
    candidates.append(DEBIAN_DIR)
    for d in candidates:
        found = {k: _find_file(d, v) for k, v in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if d == (Path(data_dir) if data_dir else None) and any(found.values()):
            missing = ", ".join(FILES[k] for k, v in found.items() if v is None)
            raise DataError(f"{d} holds only part of Fashion-MNIST; missing: {missing}")
    if download:
        target = Path(data_dir) if data_dir else CACHE_DIR
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
            found = {k: _find_file(target, v) for k, v in FILES.items()}
            if all(found.values()):
                return found  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 - any network failure means "not available here"
            pass
    raise DataError(HOW_TO_GET)


def load_split(paths: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``split`` ('train' or 'test') as uint8 images ``[M, 28, 28]`` and int64 labels ``[M]``.

    Raises:
        DataError: on corrupt files or when images and labels disagree.
    """
    images = read_idx(paths[f"{split}_images"])
    labels = read_idx(paths[f"{split}_labels"])
    for what, arr in (("images", images), ("labels", labels)):
        if arr.dtype != np.uint8:
            raise DataError(f"{paths[f'{split}_{what}']} holds {arr.dtype.name} data; Fashion-MNIST {what} are unsigned "
                            f"bytes (IDX type 0x08)")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{paths[f'{split}_images']} and {paths[f'{split}_labels']} do not match: "
            f"images {images.shape}, labels {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{paths[f'{split}_labels']} holds labels outside 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class _Images(Dataset):
    """uint8 ``[M, 28, 28]`` images -> normalised float ``[C, S, S]`` tensors, with optional augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, img_size: int, in_chans: int, augment: bool):
        self.images, self.labels = images, labels
        self.img_size, self.in_chans, self.augment = img_size, in_chans, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255.0).unsqueeze(0)  # [1, 28, 28]
        if self.augment:
            x = _random_crop_flip(x)
        x = (x - MEAN) / STD
        if self.img_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x[None], size=self.img_size, mode="bilinear", align_corners=False)[0]
        if self.in_chans != 1:
            x = x.expand(self.in_chans, -1, -1)
        return x, self.labels[i]


def _random_crop_flip(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels and random horizontal flip, on ``[1, H, W]``."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    x = padded[:, i: i + h, j: j + w]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST (Xiao et al., 2017): 10 classes, 60k train / 10k test grayscale 28x28 images.

    Args:
        data_dir: folder with the IDX files; ``None`` searches the default places.
        img_size: output resolution (bilinear resize when it is not 28).
        in_chans: output channels (the grey channel is repeated for 3-channel backbones).
        batch_size: images per batch.
        val_size: images held out of the 60k training set for validation (fixed by ``split_seed``).
        train_subset: if set, train on only this many of the remaining training images (seeded).
        num_workers: DataLoader worker processes (``None``: 0, the images are in memory).
        augment: random crop (pad 2) and horizontal flip on the training images.
        split_seed: seed of the validation split and of the training subset.
        download: allow torchvision's download as a last resort.

    Batches are ``(images [B, in_chans, img_size, img_size] float32, labels [B] int64)``.

    Raises:
        DataError: from :meth:`setup` when the data cannot be found or is corrupt.
    """

    num_classes = 10
    name = "fashion_mnist"
    display_name = "Fashion-MNIST"
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

    def __init__(
        self,
        data_dir: str | None = None,
        img_size: int = 28,
        in_chans: int = 1,
        batch_size: int = 128,
        val_size: int = 5000,
        train_subset: int | None = None,
        num_workers: int | None = 0,
        augment: bool = True,
        split_seed: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.img_size, self.in_chans = img_size, in_chans
        self.batch_size, self.val_size, self.train_subset = batch_size, val_size, train_subset
        # in-memory tensors: worker processes only add overhead, so None (auto) means 0
        self.num_workers, self.augment, self.split_seed, self.download = num_workers or 0, augment, split_seed, download

    def describe(self) -> dict[str, object]:
        """The settings that define the data a result was measured on (stored with each row)."""
        out = {"dataset": self.name, "img_size": self.img_size, "in_chans": self.in_chans,
               "val_size": self.val_size, "train_subset": self.train_subset, "augment": self.augment,
               "split_seed": self.split_seed, "batch_size": self.batch_size}
        if self.img_size != 28:  # said, and part of the key: the 28x28 images are resized for the profile
            out["resized"] = f"28x28 -> {self.img_size}x{self.img_size} (bilinear)"
        return out

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the four IDX files read (see :meth:`SplitDataModule.fingerprint`)."""
        if self._fingerprint is None:
            self.setup()
            h = hashlib.sha256()
            for key in sorted(self.paths):
                with open(self.paths[key], "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def prepare_data(self) -> None:
        locate(self.data_dir, self.download)

    def load(self) -> None:
        self.paths = locate(self.data_dir, self.download)
        images, labels = load_split(self.paths, "train")
        if not 0 < self.val_size < len(labels):
            raise DataError(f"val_size must be in (0, {len(labels)}), got {self.val_size}")
        g = torch.Generator().manual_seed(self.split_seed)
        perm = torch.randperm(len(labels), generator=g)
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size:]
        if self.train_subset is not None:
            if self.train_subset < 1:
                raise DataError(f"train_subset must be at least 1, got {self.train_subset}")
            train_idx = train_idx[: self.train_subset]
        self.train_idx, self.val_idx = train_idx, val_idx
        test_images, test_labels = load_split(self.paths, "test")
        mk = lambda im, lb, aug: _Images(im, lb, self.img_size, self.in_chans, aug)  # noqa: E731
        self.train_set = mk(images[train_idx], labels[train_idx], self.augment)
        self.val_set = mk(images[val_idx], labels[val_idx], False)
        self.test_set = mk(test_images, test_labels, False)


def synthetic_idx_dir(directory: str | Path, n_train: int = 64, n_test: int = 32, seed: int = 0,
                      shapes: Sequence[int] = (28, 28)) -> Path:
    """Write a small Fashion-MNIST-shaped IDX set (random images, labels 0..9) for tests of the loader
    itself; measured results always come from the real files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, *shapes), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(directory / f"{split}-images-idx3-ubyte", imgs)
        _write_idx(directory / f"{split}-labels-idx1-ubyte", labels)
    return directory


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())
