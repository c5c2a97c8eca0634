"""ImageNet-style folders (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) as a LightningDataModule."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import Subset

from datamodules.base import SplitDataModule
from bench_suite.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderDataModule(SplitDataModule):
    """Images in class folders, read with ``torchvision.datasets.ImageFolder``.

    ``data_dir`` must hold ``train/`` and ``val/`` (ImageNet's layout); ``val/`` is the reported test
    set, and a fixed, seeded ``val_size`` images of ``train/`` are held out for validation.
    Evaluation uses the DeiT protocol: resize to ``img_size / 0.875``, centre crop ``img_size``.

    Batches are ``(images [B, 3, img_size, img_size] float32, labels [B] int64)``.

    Raises:
        DataError: from :meth:`setup` when ``data_dir`` is missing, lacks ``train/`` or ``val/``, or
            holds no images.
    """

    name = "imagenet"
    display_name = "ImageNet (ImageFolder)"

    def __init__(self, data_dir: str | None = None, img_size: int = 224, in_chans: int = 3, batch_size: int = 64,
                 val_size: int = 10000, train_subset: int | None = None, num_workers: int = 4,
                 augment: bool = True, split_seed: int = 0, **_: object) -> None:
        super().__init__()
        if in_chans != 3:
            raise DataError("ImageFolder data is RGB; choose a 3-channel profile")
        self.data_dir, self.img_size, self.in_chans = data_dir, img_size, in_chans
        self.batch_size, self.val_size, self.train_subset = batch_size, val_size, train_subset
        self.num_workers, self.augment, self.split_seed = num_workers, augment, split_seed

    def describe(self) -> dict[str, object]:
        return {"dataset": self.name, "data_dir": str(self.data_dir), "img_size": self.img_size,
                "val_size": self.val_size, "train_subset": self.train_subset, "augment": self.augment,
                "split_seed": self.split_seed, "batch_size": self.batch_size}

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of every file's path (relative to ``data_dir``) and size under
        ``train/`` and ``val/`` (contents are not read: ImageNet is 150 GB)."""
        if self._fingerprint is None:
            root = self._check()
            h = hashlib.sha256()
            for sub in ("train", "val"):
                for path in sorted(p for p in (root / sub).rglob("*") if p.is_file()):
                    h.update(f"{path.relative_to(root)}\t{path.stat().st_size}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _check(self) -> Path:
        if not self.data_dir:
            raise DataError("--data imagenet needs --data-dir pointing at a folder with train/ and val/")
        root = Path(self.data_dir)
        for sub in ("train", "val"):
            if not (root / sub).is_dir():
                raise DataError(f"{root / sub} is missing: an ImageFolder dataset needs train/ and val/ class folders")
        return root

    def load(self) -> None:
        from torchvision import datasets, transforms as T

        root = self._check()
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose([T.RandomResizedCrop(self.img_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]) \
            if self.augment else None
        eval_tf = T.Compose([T.Resize(int(self.img_size / 0.875)), T.CenterCrop(self.img_size), T.ToTensor(), norm])
        try:
            train_aug = datasets.ImageFolder(str(root / "train"), transform=train_tf or eval_tf)
            train_eval = datasets.ImageFolder(str(root / "train"), transform=eval_tf)
            self.test_set = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"cannot read ImageFolder data in {root}: {e}") from None
        if train_aug.classes != self.test_set.classes:
            raise DataError(f"{root}/train and {root}/val have different class folders")
        self.num_classes = len(train_aug.classes)
        n = len(train_aug)
        if not 0 < self.val_size < n:
            raise DataError(f"val_size must be in (0, {n}) for {root}/train, got {self.val_size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size:]
        if self.train_subset:
            train_idx = train_idx[: self.train_subset]
        self.train_set, self.val_set = Subset(train_aug, train_idx), Subset(train_eval, val_idx)
