"""Shared fixtures: tiny backbones and a registry snapshot so tests can register methods freely."""
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


@pytest.fixture
def tiny_backbone():
    from bench_suite.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("tiny", num_classes=10)


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
