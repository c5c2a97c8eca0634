"""Just-in-time build and loading of the C++ kernels.

The kernels (``csrc/sparse_attention.cpp``, ``csrc/connectivity_topk.cpp``, ``csrc/lowrank_coefficients.cpp``)
are compiled on first use with :func:`torch.utils.cpp_extension.load` (ninja + the system C++ compiler, OpenMP,
``-O3`` and ``-march=native``) into one library that registers the operators
``torch.ops.bench_suite_kernels.sparse_attention`` (its ``sparse_attention_backward``, and
``sparse_attention_rows`` / ``sparse_attention_backward_rows`` with dense leading rows), ``connectivity_topk`` and
``lowrank_coefficients``.
The build is cached in torch's extension folder (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) under a name that hashes the sources, the flags, the torch version and
the CPU's instruction-set flags, so a second process loads the cached library in well under a second,
an edited source is rebuilt, and a cache folder shared between different CPUs never loads a library
built for another instruction set. Concurrent first builds are serialised by torch's file lock.

Why not at install time: ``pip install`` builds in an isolated environment that would need torch as a
build requirement (a multi-GB download of possibly another torch version than the one installed), and
an editable install would still need a rebuild after every source change. The JIT build uses the
installed torch, and ``python -m bench_suite speed --build`` runs it ahead of time.

``BENCH_SUITE_KERNEL_CFLAGS`` appends compiler flags (split like a shell command line) after ``-march=native``
and enters the cache name: ``-mno-avx512f`` builds the AVX2 code paths on an AVX-512 machine (how the tests
check them), ``-march=x86-64-v3`` a library for any AVX2 CPU.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from bench_suite.errors import KernelBuildError

__all__ = ["KernelBuildError", "SOURCES", "OP_NAMESPACE", "CFLAGS_ENV", "load_kernel", "kernel_available",
           "build_info"]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "sparse_attention.cpp", CSRC / "connectivity_topk.cpp", CSRC / "lowrank_coefficients.cpp")
HEADERS = (CSRC / "vec16.h",)
OP_NAMESPACE = "bench_suite_kernels"
_BASE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-unknown-pragmas"]

_lock = threading.Lock()
_loaded = False
_load_error: "KernelBuildError | None" = None


def _cpu_signature() -> str:
    """Machine, and on Linux the CPU's instruction-set flags: a library built with ``-march=native`` on one
    CPU must not be loaded on another."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sig + ":" + " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return sig + ":" + platform.processor()


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning (irrelevant
    to a CPU-only extension)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _native_supported(cxx: str) -> bool:
    try:
        r = subprocess.run([cxx, "-march=native", "-x", "c++", "-E", "-o", os.devnull, "-"], input="",
                           capture_output=True, text=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


CFLAGS_ENV = "BENCH_SUITE_KERNEL_CFLAGS"
"""Environment variable: extra compiler flags for the kernels (appended last, so they override)."""


def _flags(cxx: str) -> list[str]:
    return _BASE_FLAGS + (["-march=native"] if _native_supported(cxx) else []) + shlex.split(
        os.environ.get(CFLAGS_ENV, ""))


def _extension_name(flags: list[str]) -> str:
    texts = [p.read_text(encoding="utf-8") for p in (*SOURCES, *HEADERS)]
    text = "\n".join([*texts, " ".join(flags), torch.__version__, _cpu_signature()])
    return "bench_suite_sparse_attention_" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _op_registered() -> bool:
    try:
        ns = getattr(torch.ops, OP_NAMESPACE)
        ns.sparse_attention  # noqa: B018  (raises if not registered)
        ns.connectivity_topk  # noqa: B018
        ns.sparse_attention_backward_rows  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def build_info() -> dict[str, Any]:
    """Where and how the kernel is (or would be) built: ``name``, ``build_dir``, ``flags``, ``compiler``,
    ``cached`` (the compiled library exists), ``loaded`` (registered in this process)."""
    cxx = _compiler()
    flags = _flags(cxx) if cxx else list(_BASE_FLAGS)
    name = _extension_name(flags)
    build_dir = Path(_cpp_extension()._get_build_directory(name, verbose=False))
    return {"name": name, "build_dir": str(build_dir), "flags": flags, "compiler": cxx,
            "cached": (build_dir / f"{name}.so").exists(), "loaded": _loaded, "sources": [str(p) for p in SOURCES]}


def load_kernel(verbose: bool = False) -> None:
    """Compile (first time, cached afterwards) and load the kernel into this process; idempotent.

    Raises:
        KernelBuildError: no C++ compiler (install g++ or set ``CXX``), no ninja (``pip install ninja``),
            or the build failed (the compiler's message is included). The error is remembered: later calls
            raise it again at once instead of recompiling.
    """
    global _loaded, _load_error
    with _lock:
        if _loaded:
            return
        if _load_error is not None:
            raise _load_error
        try:
            _build_and_load(verbose)
        except KernelBuildError as e:
            _load_error = e
            raise
        _loaded = True


def _build_and_load(verbose: bool) -> None:
    cxx = _compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found to build the sparse attention kernel: install g++ (Debian: "
                               "apt-get install g++) or set CXX; impl='torch' works without it")
    cpp_extension = _cpp_extension()
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise KernelBuildError("ninja is needed to build the sparse attention kernel: pip install ninja "
                               "(impl='torch' works without it)") from None
    flags = _flags(cxx)
    name = _extension_name(flags)
    try:  # the extensions folder (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) may be unwritable
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        build_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(build_dir, os.W_OK | os.X_OK) and not (build_dir / f"{name}.so").exists():
            raise PermissionError(f"{build_dir} is not writable")
    except OSError as e:
        raise KernelBuildError(f"the torch extensions folder cannot be used to build the sparse attention kernel "
                               f"({e}); set TORCH_EXTENSIONS_DIR to a writable folder (impl='torch' works "
                               f"without it)") from None
    if not (build_dir / f"{name}.so").exists():
        print(f"bench_suite: compiling the sparse attention kernel (once; cached in {build_dir}) ...",
              file=sys.stderr, flush=True)
    env_cxx = os.environ.get("CXX")
    try:
        os.environ.setdefault("CXX", cxx)
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=verbose)
    except Exception as e:  # noqa: BLE001 - compiler/ninja/loader failures all become one clear error
        raise KernelBuildError(f"building the sparse attention kernel failed ({type(e).__name__}: {e}); "
                               f"sources in {CSRC}, build folder {build_dir}; impl='torch' works without it") from e
    finally:
        if env_cxx is None:
            os.environ.pop("CXX", None)
    if not _op_registered():
        raise KernelBuildError(f"the kernel library {name} loaded but did not register "
                               f"torch.ops.{OP_NAMESPACE}.sparse_attention")


def kernel_available() -> bool:
    """Whether the kernel is loaded or can be built and loaded now (tries once; never raises)."""
    try:
        load_kernel()
        return True
    except KernelBuildError:
        return False
