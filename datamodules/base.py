"""The part every suite datamodule shares: its declared contract, loaders of the three splits and a sample
batch for measuring."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitDataModule"]


class SplitDataModule(pl.LightningDataModule):
    """A LightningDataModule of three splits, the contract the runner, the teacher and the tables rely on.

    A subclass declares ``name`` (the ``--data`` name, stored with every row) and ``num_classes`` (``None``
    until :meth:`setup` when the data decides it), sets ``batch_size``, ``num_workers`` and ``augment`` in its
    ``__init__``, implements :meth:`describe` and :meth:`load` (fill ``train_set``, ``val_set`` and
    ``test_set``, datasets of ``(image [C, S, S], label)``, and ``paths`` where files are read). This base
    provides :meth:`setup` (loads once), :meth:`reset` (the public way to load again after a setting
    changed), the three dataloaders (training shuffled) and :meth:`sample_batch`.
    """

    name: ClassVar[str]
    display_name: ClassVar[str] = ""
    """The dataset's name in titles and captions (e.g. ``Fashion-MNIST``)."""
    class_names: ClassVar[tuple[str, ...]] = ()
    """The classes' names in label order, where the dataset has them (figures say "Ankle boot", not "9")."""
    num_classes: int | None = None
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    batch_size: int
    num_workers: int
    augment: bool
    paths: dict[str, Path] | None = None
    """The files the data was read from (``None`` where the datamodule reads a folder tree)."""
    _ready: bool = False
    _fingerprint: str | None = None

    def describe(self) -> dict[str, object]:
        """The settings that define the data a result was measured on (stored with each row; part of the
        configuration key): at least ``dataset`` (= :attr:`name`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement describe()")

    def fingerprint(self) -> str | None:
        """A short hash of the data files this datamodule reads (``None`` if it cannot tell): stored with every
        run and part of its configuration key, so that other data at the same ``--data-dir`` is never taken
        for data already measured."""
        return None

    def load(self) -> None:
        """Read the data and fill the three splits (called once by :meth:`setup`).

        Raises:
            DataError: when the data cannot be found, read or used.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def setup(self, stage: str | None = None) -> None:
        """Load the splits on first use (:meth:`load`); later calls do nothing until :meth:`reset`."""
        if not self._ready:
            self.load()
            self._ready = True

    def reset(self) -> None:
        """Forget the loaded splits: the next :meth:`setup` loads them again (after changing ``augment``,
        ``train_subset`` or another setting that :meth:`load` reads)."""
        self._ready = False

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def sample_batch(self, n: int = 8, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images of a split as one batch ``(images [n, C, S, S], labels [n] int64)``, for FLOP
        counting and speed measurements.

        Raises:
            KeyError: for a split other than ``train``, ``val``, ``test``.
        """
        self.setup()
        ds: Any = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        xs, ys = zip(*(ds[i] for i in range(min(n, len(ds)))))
        return torch.stack(xs), torch.tensor([int(y) for y in ys], dtype=torch.long)
