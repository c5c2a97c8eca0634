"""LightningDataModules of the suite: Fashion-MNIST (default, offline) and ImageNet-style folders."""
from __future__ import annotations

from typing import Any

from bench_suite.errors import DataError
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.imagefolder import ImageFolderDataModule

DATAMODULES = {"fashion_mnist": FashionMNISTDataModule, "imagenet": ImageFolderDataModule}

__all__ = ["DATAMODULES", "DataError", "FashionMNISTDataModule", "ImageFolderDataModule", "create_datamodule"]


def create_datamodule(name: str, **kwargs: Any):
    """Build the datamodule ``name`` (``fashion_mnist`` or ``imagenet``) with its keyword arguments.

    Raises:
        DataError: for an unknown dataset name (the message lists the known ones).
    """
    try:
        cls = DATAMODULES[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATAMODULES)}") from None
    return cls(**kwargs)
