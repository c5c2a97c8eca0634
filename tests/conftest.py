"""Shared test helpers: seeded tiny backbones and random images, a registry snapshot so tests can register
methods freely, the Fashion-MNIST location and a few-step training helper."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def registry_snapshot():
    """Restore the method registry (and the plugin-loaded flag) after the test."""
    from bench_suite import registry

    registry.load_plugins()
    saved, loaded = dict(registry._REGISTRY), registry._plugins_loaded
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    registry._plugins_loaded = loaded


def tiny_vit(profile: str = "tiny", seed: int = 0, **kwargs):
    """A randomly initialised backbone of ``profile`` (seeded; 10 classes unless ``kwargs`` say otherwise)."""
    from bench_suite.backbones import create_backbone

    torch.manual_seed(seed)
    return create_backbone(profile, **kwargs)


def random_images(b: int = 4, seed: int = 0, chans: int = 1, size: int = 28) -> torch.Tensor:
    """``[b, chans, size, size]`` standard-normal images from a seeded generator (the tiny and mini profiles
    take 1 x 28 x 28)."""
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed))


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def have_fashion_mnist() -> bool:
    return os.path.isfile(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))


def fit_steps(module, images: torch.Tensor, labels: torch.Tensor, steps: int = 3, batch_size: int = 8):
    """Train ``module`` for ``steps`` optimiser steps on ``(images, labels)`` with a bare CPU Trainer (no
    logger, checkpoints, progress bar or validation); returns the Trainer (``callback_metrics`` hold the loss)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=batch_size))
    return trainer
