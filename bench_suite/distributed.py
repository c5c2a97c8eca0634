"""Multi-process (DDP) control of a sweep: who starts the processes, who is rank 0, what rank 0 decides.

Every process runs the whole sweep (as under ``srun``); rank 0 decides, locks and writes, and
:func:`broadcast` gives its decisions to the others. A method that leaves parameters unused in some steps
declares it (``ddp_find_unused_parameters``) and :func:`ddp_strategy_for` honours it.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from bench_suite.errors import UserError

__all__ = ["SUPPORTED_STRATEGIES", "world_info", "broadcast", "ddp_strategy_for", "start_processes",
           "die_with_launcher", "started_by_cluster", "processes_external", "is_rank_zero_process"]


def world_info() -> tuple[int, int]:
    """``(global rank, world size)`` of this process: from ``torch.distributed`` once initialised,
    else 0 and 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    rank, world = world_info()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


SUPPORTED_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def ddp_strategy_for(module: Any, strategy: str) -> str:
    """The Lightning strategy a method needs under ``--strategy ddp``: ``ddp_find_unused_parameters_true``
    for a method that declares parameters unused in some steps (class attribute
    ``ddp_find_unused_parameters = True``, see :mod:`bench_suite.registry`), else ``ddp``; other strategies
    are returned unchanged."""
    if strategy != "ddp":
        return strategy
    return "ddp_find_unused_parameters_true" if getattr(module, "ddp_find_unused_parameters", False) else "ddp"


def start_processes(settings: Any) -> tuple[Any, int]:
    """``(fabric, world size)``: a Lightning Fabric that starts/joins the DDP processes of a multi-process
    run (``None`` for one process); ``settings`` is a :class:`bench_suite.training.TrainSettings`.

    Raises:
        UserError: for a strategy the sweep cannot run under, or devices Lightning rejects.
    """
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    strategy = str(settings.strategy)
    if strategy not in SUPPORTED_STRATEGIES:
        raise UserError(f"--strategy {strategy} is not supported by the sweep runner; use {', '.join(SUPPORTED_STRATEGIES)}"
                          " (every process runs the sweep, as under srun)")
    try:
        fabric = Fabric(accelerator=settings.accelerator, devices=settings.devices, num_nodes=settings.num_nodes,
                        strategy="auto" if strategy == "auto" else "ddp")
    except Exception as e:  # noqa: BLE001 - Lightning's MisconfigurationException, ValueError, RuntimeError
        raise UserError(f"cannot run on --accelerator {settings.accelerator} --devices {settings.devices} "
                          f"--num-nodes {settings.num_nodes}: {str(e).splitlines()[0]}") from None
    world = int(fabric.world_size)
    if world == 1:
        return None, 1
    if not isinstance(fabric.strategy, DDPStrategy):
        raise UserError(f"{world} processes need --strategy ddp, Lightning chose {type(fabric.strategy).__name__}")
    return fabric, world


def die_with_launcher() -> None:
    """In a process that Lightning's launcher started (``LOCAL_RANK`` > 0, not srun/torchrun): ask the
    kernel to kill it when its parent, rank 0 of the node, dies (``PR_SET_PDEATHSIG``), instead of leaving
    it waiting in a collective until the timeout."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0") or started_by_cluster():
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def started_by_cluster() -> bool:
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def processes_external(world: int) -> bool:
    """Whether this multi-process run's processes were started by someone else (srun, torchrun, or the
    Lightning launcher of rank 0): then a missing teacher is an error rather than trained here."""
    if world == 1:
        return False
    return "LOCAL_RANK" in os.environ or started_by_cluster()


def is_rank_zero_process() -> bool:
    """Whether this process is rank 0 by its launcher's environment (``RANK``, ``SLURM_PROCID``,
    ``LOCAL_RANK``), before any process group exists."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0"))) == "0"
