"""ImageNet-style folders (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) as a LightningDataModule, with timm's
data pipeline: the evaluation transform of the backbone's pretrained configuration and DeiT's training recipe."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from datamodules.base import SplitDataModule
from bench_suite.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DEIT_AUGMENTATION: dict[str, Any] = {
    "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
}
"""DeiT's training recipe (Touvron et al. 2021, its ``main.py`` defaults; the paper follows it): RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25 (per pixel), mixup alpha 0.8 / cutmix alpha 1.0 (timm's ``Mixup``,
switch 0.5, per batch) with label smoothing 0.1 in the soft targets. RandomResizedCrop, flip and bicubic
interpolation are always part of the training transform."""

NO_AUGMENTATION: dict[str, Any] = {"auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0}


def default_num_workers() -> int:
    """DataLoader workers per process when ``--num-workers`` is not given: the CPUs this process may use, at
    most 8 (JPEG decoding and augmentation are the bottleneck of ImageNet training)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def eval_data_config(model_name: str | None, img_size: int) -> dict[str, Any]:
    """timm's data configuration of the timm model ``model_name`` at ``img_size``
    (``timm.data.resolve_data_config`` on its pretrained configuration: interpolation, crop fraction, mean,
    std; ``input_size`` set to ``img_size``). A model without a pretrained configuration gets timm's defaults."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name) if model_name else None
    pretrained = cfg.to_dict() if cfg is not None else {}
    return resolve_data_config({"input_size": (3, img_size, img_size)}, pretrained_cfg=pretrained)


class ImageFolderDataModule(SplitDataModule):
    """Images in class folders, read with ``torchvision.datasets.ImageFolder``, transformed by timm.

    ``data_dir`` must hold ``train/`` and ``val/`` (ImageNet's layout); ``val/`` is the reported test
    set, and a fixed, seeded ``val_size`` images of ``train/`` are held out for validation.

    Args:
        data_dir: the folder with ``train/`` and ``val/``.
        img_size: the backbone's input resolution.
        in_chans: must be 3.
        batch_size: images per batch (the runner's global batch; see :mod:`bench_suite.training`).
        val_size: images of ``train/`` held out for validation (seeded by ``split_seed``).
        train_subset: train on only the first this many of the rest (seeded order).
        num_workers: DataLoader workers per process (``None``: :func:`default_num_workers`).
        augment: the training recipe below; ``False``: training images get the evaluation transform and no
            mixup.
        split_seed: seed of the validation split.
        model_name: the timm model whose pretrained configuration gives the evaluation transform
            (:func:`eval_data_config`; e.g. ``deit_small_patch16_224``: bicubic, crop 0.9, resize 248).
        augmentation: the training recipe's settings over :data:`DEIT_AUGMENTATION` (keys ``auto_augment``,
            ``re_prob``, ``mixup``, ``cutmix``, ``smoothing``); mixup/cutmix make soft targets
            ``[B, num_classes]`` (label smoothing included) that the methods train on with soft-target
            cross-entropy.

    Evaluation uses exactly ``timm.data.create_transform(**eval_data_config(model_name, img_size))``. Batches are
    ``(images [B, 3, img_size, img_size] float32, labels [B] int64)``; while training with mixup or cutmix the
    labels are soft targets ``[B, num_classes]`` float32 (:class:`MixupCollate`, timm's ``Mixup``; the training
    loader then drops its last incomplete batch).

    Raises:
        DataError: for an unknown augmentation setting; from :meth:`setup` when ``data_dir`` is missing, lacks
            ``train/`` or ``val/``, or holds no images.
    """

    name = "imagenet"
    display_name = "ImageNet (ImageFolder)"

    def __init__(self, data_dir: str | None = None, img_size: int = 224, in_chans: int = 3, batch_size: int = 64,
                 val_size: int = 10000, train_subset: int | None = None, num_workers: int | None = None,
                 augment: bool = True, split_seed: int = 0, model_name: str | None = None,
                 augmentation: dict[str, Any] | None = None, **_: object) -> None:
        super().__init__()
        if in_chans != 3:
            raise DataError("ImageFolder data is RGB; choose a 3-channel profile")
        unknown = sorted(set(augmentation or {}) - set(DEIT_AUGMENTATION))
        if unknown:
            raise DataError(f"unknown augmentation setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(DEIT_AUGMENTATION)}")
        self.data_dir, self.img_size, self.in_chans = data_dir, img_size, in_chans
        self.batch_size, self.val_size, self.train_subset = batch_size, val_size, train_subset
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.augment, self.split_seed, self.model_name = augment, split_seed, model_name
        self.augmentation = {**(DEIT_AUGMENTATION if augment else NO_AUGMENTATION), **(augmentation or {})}
        self.data_config = eval_data_config(model_name, img_size)
        self.mixup_fn = None

    def describe(self) -> dict[str, object]:
        return {"dataset": self.name, "data_dir": str(self.data_dir), "img_size": self.img_size,
                "val_size": self.val_size, "train_subset": self.train_subset, "augment": self.augment,
                "split_seed": self.split_seed, "batch_size": self.batch_size,
                "eval_transform": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()},
                "augmentation": dict(self.augmentation)}

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

    def eval_transform(self) -> Any:
        """timm's evaluation transform of :attr:`data_config` (resize, centre crop, tensor, normalise)."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def train_transform(self) -> Any:
        """timm's training transform: RandomResizedCrop + flip at the evaluation interpolation, then
        :attr:`augmentation`'s RandAugment and random erasing."""
        from timm.data import create_transform

        aug, cfg = self.augmentation, self.data_config
        return create_transform(cfg["input_size"], is_training=True, auto_augment=aug["auto_augment"],
                                interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                                re_prob=float(aug["re_prob"]), re_mode="pixel", re_count=1)

    def load(self) -> None:
        from torchvision import datasets

        root = self._check()
        eval_tf = self.eval_transform()
        train_tf = self.train_transform() if self.augment else eval_tf
        try:
            train_aug = datasets.ImageFolder(str(root / "train"), transform=train_tf)
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
        aug = self.augmentation
        self.mixup_fn = None
        if self.augment and (aug["mixup"] > 0 or aug["cutmix"] > 0):
            from timm.data import Mixup

            self.mixup_fn = Mixup(mixup_alpha=float(aug["mixup"]), cutmix_alpha=float(aug["cutmix"]), prob=1.0,
                                  switch_prob=0.5, mode="batch", label_smoothing=float(aug["smoothing"]),
                                  num_classes=self.num_classes)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; with mixup/cutmix collated by :class:`MixupCollate` (soft targets) and the
        last batch dropped (timm's batch mixup pairs images)."""
        collate = MixupCollate(self.mixup_fn, self.num_classes, float(self.augmentation["smoothing"])) \
            if self.mixup_fn is not None else None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=collate is not None, collate_fn=collate)


class MixupCollate:
    """Collate ``(image, label)`` samples, then apply timm's ``Mixup``: ``(images [B, C, H, W], soft targets
    [B, num_classes] float32)``, label smoothing included. Runs in the loader (its workers included), so that
    every way of building the training loader from this one (the runner's resumable, sharded loader copies its
    ``collate_fn``) mixes. An odd batch (a process's share of a global batch) is left unmixed with smoothed
    one-hot targets, as timm's batch mode needs pairs."""

    def __init__(self, mixup_fn: Any, num_classes: int, smoothing: float) -> None:
        self.mixup_fn, self.num_classes, self.smoothing = mixup_fn, int(num_classes), float(smoothing)

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.utils.data import default_collate
        from timm.data.mixup import one_hot

        x, y = default_collate(samples)
        if len(x) % 2:
            off = self.smoothing / self.num_classes
            return x, one_hot(y, self.num_classes, on_value=1.0 - self.smoothing + off, off_value=off)
        return self.mixup_fn(x, y)
