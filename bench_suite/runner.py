"""The benchmark runner: teacher, fine-tuning, evaluation, FLOPs, speed, results store, tables."""
from __future__ import annotations

from typing import Any

from bench_suite.backbones import get_profile
from bench_suite.training import TrainSettings
from datamodules import create_datamodule

# Per-profile defaults of the fine-tuning protocol (the run's --epochs/--train-subset override them).
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mini": {"epochs": 1, "train_subset": 10000, "batch_size": 128},
    "tiny": {"epochs": 1, "train_subset": 512, "batch_size": 64},
}
PAPER_DEFAULTS = {"epochs": 30, "train_subset": None, "batch_size": 64}


def profile_defaults(profile: str) -> dict[str, Any]:
    get_profile(profile)
    return dict(RUN_DEFAULTS.get(profile, PAPER_DEFAULTS))


def make_datamodule(cfg: Any, train_subset: int | None = None, batch_size: int | None = None):
    """The datamodule for ``cfg.data`` at the profile's resolution and channels."""
    p = get_profile(cfg.profile)
    defaults = profile_defaults(cfg.profile)
    return create_datamodule(cfg.data, data_dir=cfg.data_dir, img_size=p.img_size, in_chans=p.in_chans,
                             batch_size=batch_size or defaults["batch_size"], train_subset=train_subset,
                             num_workers=cfg.num_workers, split_seed=0)


def train_settings(cfg: Any, epochs: int) -> TrainSettings:
    return TrainSettings(epochs=epochs, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                         accelerator=cfg.accelerator, progress=not cfg.no_progress)
