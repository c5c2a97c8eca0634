"""``run --compile MODE``: ``torch.compile`` of the model being trained, as a Lightning callback that
:func:`bench_suite.training.make_trainer` adds when the mode is not ``"none"``."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

__all__ = ["CompileModel"]


class CompileModel(Callback):
    """``run --compile <mode>``: ``torch.compile`` the LightningModule's ``model`` (the network being trained,
    not the frozen teacher) in place before training and evaluation.

    ``nn.Module.compile`` keeps the module and its ``state_dict`` keys (checkpoints stay loadable without
    compilation); graph breaks (the C++ sparse attention kernels, data-dependent token counts) fall back to
    eager for those parts. Compiled and eager results agree to float rounding, not bit for bit, so the mode
    enters every row's configuration (``config["trainer"]["compile"]``).

    Args:
        mode: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``).
        backend: a ``torch.compile`` backend (``"inductor"``; tests use ``"eager"``).
    """

    def __init__(self, mode: str = "default", backend: str = "inductor") -> None:
        self.mode, self.backend = mode, backend

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        if isinstance(model, torch.nn.Module) and getattr(model, "_compiled_call_impl", None) is None:
            model.compile(mode=None if self.backend != "inductor" else self.mode, backend=self.backend)
