"""The one finder and loader of the runner's trained checkpoints.

The runner writes each configuration's resumable Lightning checkpoint to
``<output>/runs/<method>-<keep rate>-<key>/checkpoints/last.ckpt``, where ``<key>`` is the configuration key
of its row in the results store; checkpoints hold the student only (the frozen teacher is cached apart) and
the backbone's architecture, so ``Method.load_from_checkpoint(path)`` works on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench_suite.backbones import create_backbone
from bench_suite.errors import UserError
from bench_suite.registry import get_method
from bench_suite.store import STORE_FILENAME, ResultsStore

__all__ = ["run_dir", "checkpoint_path", "find_checkpoints", "load_trained"]


def run_dir(output: str | Path, method: str, keep_rate: float, key: str) -> Path:
    """``<output>/runs/<method>-<keep rate>-<key>``: the folder of one configuration's training (checkpoints,
    logs), readable by name and unique by its configuration key."""
    return Path(output) / "runs" / f"{method}-{float(keep_rate):g}-{key}"


def checkpoint_path(output: str | Path, key: str, method: str, keep_rate: float) -> Path:
    """The runner's final checkpoint of the configuration ``key``: ``<run_dir>/checkpoints/last.ckpt``
    (``<output>/runs/<key>/...`` for runs made before the folders carried the method and keep rate)."""
    path = run_dir(output, method, keep_rate, key) / "checkpoints" / "last.ckpt"
    old = Path(output) / "runs" / str(key) / "checkpoints" / "last.ckpt"
    return path if path.exists() or not old.exists() else old


def find_checkpoints(output: str | Path, method: str, profile: str, dataset: str | None,
                     keep_rate: float | None = None) -> list[tuple[float, str, Path]]:
    """Trained checkpoints of ``method`` in the store: ``(keep_rate, key, path)`` of every finished row of
    the profile and dataset (any dataset if ``None``; and ``keep_rate`` if given) whose checkpoint file exists,
    newest first; ``[]`` without a store.

    Raises:
        bench_suite.errors.StoreCorruptError: for an unreadable store.
    """
    db = Path(output) / STORE_FILENAME
    if not db.is_file():
        return []
    with ResultsStore(db, create=False) as store:
        rows = store.rows(method=method, profile=profile, dataset=dataset, status="ok")
    out = []
    for _, r in rows.sort_values("created", ascending=False).iterrows() if len(rows) else ():
        if keep_rate is not None and abs(float(r["keep_rate"]) - float(keep_rate)) > 1e-9:
            continue
        path = checkpoint_path(output, r["key"], r["method"], r["keep_rate"])
        if path.is_file():
            out.append((float(r["keep_rate"]), str(r["key"]), path))
    return out


def load_trained(method: str, path: str | Path, profile: str, overrides: dict[str, Any] | None = None) -> Any:
    """Load a method's LightningModule from a runner checkpoint onto a fresh backbone of ``profile`` (the
    classifier size is read from the checkpoint; ``teacher=None``), in eval mode on the CPU. ``overrides``
    replace saved settings that do not change the weights (e.g. ``attention_impl``).

    Raises:
        UserError: for a missing file, or a file that is not a checkpoint of ``method`` on ``profile``.
        UnknownMethodError: for an unknown method.
    """
    path = Path(path)
    spec = get_method(method)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        num_classes = int(state["state_dict"]["model.head.weight"].shape[0])
        module = spec.factory.load_from_checkpoint(
            str(path), backbone=create_backbone(profile, num_classes=num_classes), teacher=None, map_location="cpu",
            **(overrides or {}))
    except Exception as e:  # noqa: BLE001 - unpickling, missing keys, shape mismatches: all one user error
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {path} as {method} on the {profile} profile: {first}") from None
    return module.eval()
