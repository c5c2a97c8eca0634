"""Versions and git revision recorded with every result."""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "torchvision", "timm", "pytorch-lightning", "torchmetrics", "fvcore", "numpy")


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The suite's git revision (with ``-dirty`` for uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "sve", "neon", "asimd")
"""CPU instruction-set extensions recorded when the CPU has them (they decide kernel speed)."""


@lru_cache(maxsize=1)
def hardware() -> dict[str, str]:
    """The machine a speed was measured on: CPU model, logical CPUs, torch's intra-op threads, the ISA
    extensions of :data:`ISA_FLAGS` the CPU has, and the GPU's name where CUDA is available."""
    import os

    import torch

    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu in ("unknown", "", platform.machine()):
                    cpu = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    out = {"cpu": cpu, "cpus": str(os.cpu_count() or 0), "threads": str(torch.get_num_threads()),
           "isa": " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS[:3])}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def versions() -> dict[str, str]:
    """Versions of Python, the key packages, the machine (:func:`hardware`), the git revision, and the memory
    allocator the process times under (:func:`bench_suite.allocator.allocator_description`)."""
    from bench_suite.allocator import allocator_description

    return {**_static_versions(), "allocator": allocator_description()}


@lru_cache(maxsize=1)
def _static_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}",
           **hardware()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    out["git"] = git_revision()
    return out
