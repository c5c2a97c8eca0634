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


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of Python, the key packages, the machine, and the git revision."""
    out = {"python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}"}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    out["git"] = git_revision()
    return out
