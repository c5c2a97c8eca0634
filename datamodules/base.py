"""The part every suite datamodule shares: loaders of the three splits and a sample batch for measuring."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitDataModule"]


class SplitDataModule(pl.LightningDataModule):
    """A LightningDataModule whose ``setup`` fills ``train_set``, ``val_set`` and ``test_set`` (datasets of
    ``(image [C, S, S], label)``) and whose ``__init__`` sets ``batch_size`` and ``num_workers``. Provides the
    three dataloaders (training shuffled) and :meth:`sample_batch`."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    batch_size: int
    num_workers: int

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
