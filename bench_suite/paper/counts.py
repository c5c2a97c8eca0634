"""MHSA FLOPs of the paper's configurations at paper scale (random weights, real architectures), counted
in worker processes."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from bench_suite.errors import UserError
from bench_suite.paper.data import NUM_CLASSES_PAPER, SuiteConfig

__all__ = ["FlopCount", "flops_images", "fast_impl", "count_one", "default_workers", "CountJob"]


# --------------------------------------------------------------------------- FLOPs at paper scale
@dataclass
class FlopCount:
    """The suite's count of one configuration on one paper-scale profile (per image).

    Attributes:
        profile: the architecture counted (``deit_s``, ``lvvit_s``, ``deit_t384``).
        config: the configuration.
        mhsa_mflops: measured MHSA MFLOPs (fvcore).
        mhsa_mflops_paper_rule: the paper's hand-counting rule on the same model (MFLOPs) or None.
        total_gflops: the whole model (GFLOPs).
        tokens: tokens ``N`` of the backbone (CLS included).
        sparsity: the method's ``sparsity_report()`` after the count's forward pass.
        seconds: wall time of building and counting.
    """

    profile: str
    config: SuiteConfig
    mhsa_mflops: float
    mhsa_mflops_paper_rule: float | None
    total_gflops: float
    tokens: int
    sparsity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def flops_images(profiles: Iterable[str], data: str = "fashion_mnist", data_dir: str | None = None
                 ) -> tuple[dict[tuple[int, int], torch.Tensor], str]:
    """One real test image per (resolution, channels) of ``profiles``: the first test image of ``data``
    (``fashion_mnist`` if ``data`` cannot be read, e.g. ImageNet without ``--data-dir``), resized by the
    datamodule. Returns the images ``[1, C, S, S]`` keyed by ``(S, C)`` and a description of their source.

    Raises:
        UserError: if neither dataset can be read (token-pruning and Sparsifiner counts depend on the
            image, so the tables never count on made-up inputs).
    """
    from bench_suite.backbones import get_profile
    from datamodules import DataError, create_datamodule

    shapes = sorted({(get_profile(p).img_size, get_profile(p).in_chans) for p in profiles})
    errors = []
    for name, ddir in dict.fromkeys([(data, data_dir), ("fashion_mnist", None)]):
        try:
            out = {}
            for size, chans in shapes:
                dm = create_datamodule(name, data_dir=ddir, img_size=size, in_chans=chans, batch_size=1,
                                       num_workers=0)
                out[(size, chans)] = dm.sample_batch(1, "test")[0]
            note = "" if name == data else f" ({data} could not be read: {errors[0]})"
            return out, f"the first {name} test image, resized by the datamodule{note}"
        except (DataError, OSError) as e:
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise UserError("no test image to count FLOPs on: " + "; ".join(errors))


def fast_impl() -> str | None:
    """``"cpp"`` when the fused sparse attention kernel is already compiled for this code version (cached by
    the hash of its sources; never compiled here), else None. The implementation only changes how fast the
    count's forward pass runs, not the count: the sparse product is counted from its shapes
    (``bench_suite::sparse_attention``) whichever implementation runs inside."""
    try:
        from bench_suite.kernels import build_info, load_kernel

        if not build_info()["cached"]:
            return None
        load_kernel()
        return "cpp"
    except Exception:  # noqa: BLE001 - any kernel problem: count with the torch implementation
        return None


_BASES: dict[str, torch.nn.Module] = {}  # per process: the profile's random backbone (seed 0), built once per call


def _base_backbone(profile: str) -> torch.nn.Module:
    from bench_suite.backbones import create_backbone

    if profile not in _BASES:
        torch.manual_seed(0)
        _BASES[profile] = create_backbone(profile, num_classes=NUM_CLASSES_PAPER).eval()
    return _BASES[profile]


def count_one(profile: str, cfg: SuiteConfig, image: torch.Tensor, impl: str | None = None) -> FlopCount:
    """Build ``cfg``'s method module on the profile's backbone (1000 classes, seed 0, random weights; the
    module's own new weights with seed 0 too) and count it in eval mode on ``image`` ``[1, C, S, S]``.

    Raises:
        bench_suite.flops.UncountedOpError: if the method runs an op the counter cannot count.
    """
    from bench_suite.backbones import num_tokens
    from bench_suite.flops import count_flops
    from bench_suite.registry import get_method

    start = time.perf_counter()
    torch.manual_seed(0)
    spec = get_method(cfg.method)
    extra = {"attention_impl": impl} if impl and "attention_impl" in spec.defaults() else {}
    module = spec.factory(copy.deepcopy(_base_backbone(profile)), keep_rate=cfg.keep_rate, teacher=None,
                          **{**extra, **cfg.overrides_dict}).eval()
    report = count_flops(module.model, image)
    rule = module.paper_mhsa_flops()
    return FlopCount(profile, cfg, report.mhsa_mflops, None if rule is None else rule / 1e6, report.total_gflops,
                     num_tokens(module.model), {k: float(v) for k, v in module.sparsity_report().items()},
                     time.perf_counter() - start)


def _count_task(tasks: list[tuple[str, SuiteConfig, torch.Tensor]], threads: int) -> list[FlopCount]:
    """Worker-process entry: count ``tasks`` with ``threads`` intra-op threads."""
    torch.set_num_threads(max(1, threads))
    impl = fast_impl()
    return [count_one(p, cfg, image, impl) for p, cfg, image in tasks]


def _split(todo: list[tuple[str, SuiteConfig]], workers: int) -> list[list[tuple[str, SuiteConfig]]]:
    """Split the counts into ``workers`` chunks of about equal cost, each profile's configurations kept
    together where possible (a worker builds each profile's backbone once). Cost ~ tokens^2 per config."""
    from bench_suite.backbones import get_profile

    def cost(profile: str) -> float:
        prof = get_profile(profile)
        return 1.0 + ((prof.img_size // 16) ** 2 / 196.0) ** 1.5

    total = sum(cost(p) for p, _ in todo)
    chunks: list[list[tuple[str, SuiteConfig]]] = [[] for _ in range(workers)]
    i, acc = 0, 0.0
    for item in sorted(todo, key=lambda t: t[0]):
        if acc >= total * (i + 1) / workers and i < workers - 1:
            i += 1
        chunks[i].append(item)
        acc += cost(item[0])
    return [c for c in chunks if c]


def default_workers() -> int:
    """Processes for the paper-scale counts: 2 on a machine with at least 2 cores, else 1."""
    import os

    return 2 if (os.cpu_count() or 1) >= 2 else 1


class CountJob:
    """Paper-scale FLOP counts running in the background (``workers > 1``: spawned worker processes, each
    with ``cpu_count // workers`` threads) or in the calling process at :meth:`result` (``workers == 1``)."""

    def __init__(self, items: Iterable[tuple[str, SuiteConfig]], images: Mapping[tuple[int, int], torch.Tensor],
                 workers: int | None = None, log: Callable[[str], None] = print) -> None:
        import os

        from bench_suite.backbones import get_profile

        self.todo = list(dict.fromkeys(items))
        self.images = images
        self.log = log
        self.workers = max(1, min(default_workers() if workers is None else int(workers), len(self.todo)))
        self._pool = None
        self._futures: list[Any] = []
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
            for chunk in _split(self.todo, self.workers):
                tasks = [(p, c, images[(get_profile(p).img_size, get_profile(p).in_chans)]) for p, c in chunk]
                self._futures.append(self._pool.submit(_count_task, tasks, threads))

    def result(self) -> dict[tuple[str, SuiteConfig], FlopCount]:
        """Wait for (or run) the counts; returns them keyed by ``(profile, config)``.

        Raises:
            bench_suite.flops.UncountedOpError: if a method runs an op the counter cannot count.
        """
        from concurrent.futures.process import BrokenProcessPool

        from bench_suite.backbones import get_profile

        counts: list[FlopCount] = []
        if self._pool is not None:
            try:
                for fut in self._futures:
                    for fc in fut.result():
                        counts.append(fc)
                        self._log(fc)
            except BrokenProcessPool as e:  # e.g. a worker killed for memory: count here instead
                self.log(f"  worker processes failed ({e}); counting in this process")
                counts = []
                self._pool = None
            finally:
                self.close()
        if not counts:
            impl = fast_impl()
            try:
                for p, c in self.todo:
                    prof = get_profile(p)
                    counts.append(count_one(p, c, self.images[(prof.img_size, prof.in_chans)], impl))
                    self._log(counts[-1])
            finally:
                _BASES.clear()
        return {(fc.profile, fc.config): fc for fc in counts}

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _log(self, fc: FlopCount) -> None:
        self.log(f"  {fc.profile:<9} {fc.config.label():<44} MHSA {fc.mhsa_mflops:9.2f} MFLOPs ({fc.seconds:.1f} s)")
