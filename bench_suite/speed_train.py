"""Training-step speed of whole models (``python -m bench_suite speed --train``): one optimiser step of every
method as the suite trains it, timed interleaved in one process.

A step is what :meth:`methods.base.BenchModule.training_step` computes plus the update: the student's training
forward (:meth:`~methods.base.BenchModule.forward_train`), the teacher's forward where the method's losses use it
(:meth:`~methods.base.BenchModule.forward_teacher`), the method's losses, the backward and an AdamW step over the
parameters that train, on one batch of random images ``[B, C, H, W]`` with random labels. Each method is first put
in the state of its main training phase (:meth:`~methods.base.BenchModule.prepare_train_timing`; Sparsifiner: phase
2, the backbone trains with the frozen predictor, as in all but its first epoch). Weights are random (the teacher
too: a random backbone of the profile), so the method's ``prepare_timing`` emulates trained sparsity where asked
(``--coef-density``). The rows go to the store and ``speed.csv`` with ``scope: train_step``: ``latency_ms_*`` is
ms per training step (median, p90, min), ``img_per_s`` the training throughput and ``latency_ratio_to_full`` the
step time relative to the reference method's in the same interleaved rounds (the median of the per-round ratios,
with its 95 % confidence interval ``latency_ratio_ci95_low`` / ``_high``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from bench_suite.backbones import create_backbone, get_profile
from bench_suite.kernels import load_kernel
from bench_suite.measure import measure_callables
from bench_suite.registry import reference_method
from bench_suite.speed_models import (SpeedOptions, _base_config, _entry, _load_avg, _plan, _row, _threads,
                                      ratio_metrics, ratio_text)

__all__ = ["train_step_benchmark", "TRAIN_LR"]

NUM_CLASSES = 10
TRAIN_LR = 1e-6
"""AdamW learning rate of the timed steps: small, so that the timed rounds leave the weights (and the emulated
sparsity) where they were; the step's cost does not depend on it."""


def _step_fn(module: Any, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    """One training step of ``module`` (forward, teacher, losses, backward, AdamW update); returns the loss."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAIN_LR)
    batch = (images, labels)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        terms = module.losses(module.forward_train(images), module.forward_teacher(images), batch)
        loss = torch.stack(list(terms.values())).sum()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def train_step_benchmark(opts: SpeedOptions, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Training-step time of every method (``opts.methods``) at its keep rates and implementations, interleaved
    (see the module docstring); returns store rows.

    Raises:
        bench_suite.registry.UnknownMethodError: for an unknown method name.
        bench_suite.backbones.UnknownProfileError: for an unknown profile.
        FloatingPointError: if a timed step's loss is not finite.
    """
    profile = get_profile(opts.profile)
    threads = _threads(opts)
    gen = torch.Generator().manual_seed(opts.seed)
    images = torch.randn(opts.batch_size, profile.in_chans, profile.img_size, profile.img_size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (opts.batch_size,), generator=gen)
    torch.manual_seed(opts.seed)
    teacher = create_backbone(profile, num_classes=NUM_CLASSES).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    plan, hparams = _plan(opts)
    steps, labels_of, prepared = {}, {}, {}
    for spec, r, impl in plan:
        torch.manual_seed(opts.seed)
        label, extra = _entry(spec, r, impl, hparams)
        module = spec.factory(create_backbone(profile, num_classes=NUM_CLASSES), keep_rate=r, teacher=teacher,
                              **extra)
        info = dict(module.prepare_train_timing())
        if opts.coef_density is not None:
            module.eval()
            info.update(module.prepare_timing(images, coef_density=opts.coef_density))
        module.train()
        steps[label] = _step_fn(module, images, labels)
        labels_of[label] = (spec, r, impl, extra)
        prepared[label] = info
    if any(impl == "cpp" for _, _, impl, _ in labels_of.values()):
        load_kernel()
    log(f"training steps on {profile.name} ({profile.img_size}px), batch {opts.batch_size}, {threads} thread(s), "
        f"fp32, random weights: {', '.join(steps)}; {opts.repeats} interleaved rounds after {opts.warmup} warm-up")
    load = _load_avg()
    res = measure_callables(steps, warmup=opts.warmup, repeats=opts.repeats, num_threads=threads, grad=True)
    with torch.enable_grad():
        losses = {label: fn() for label, fn in steps.items()}  # one more step each: the loss stays finite
    bad = [label for label, v in losses.items() if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise FloatingPointError(f"non-finite training loss after the timed steps: {', '.join(bad)}")
    reference = reference_method().name
    full = next((res[lab]["samples_ms"] for lab, (s, *_) in labels_of.items() if s.name == reference), None)
    rows = []
    for label, r in res.items():
        spec, rate, impl, extra = labels_of[label]
        config = {**_base_config(opts, "train_step", threads), "method": spec.name, "keep_rate": rate,
                  "attention_impl": impl, "img_size": profile.img_size, "optimizer": f"AdamW lr {TRAIN_LR:g}",
                  "teacher": "random weights of the profile's backbone",
                  "hparams": {**spec.defaults(), "keep_rate": rate, **extra}, **prepared[label]}
        metrics: dict[str, Any] = {"latency_ms_median": r["median_ms"], "latency_ms_p90": r["p90_ms"],
                                   "latency_ms_min": r["min_ms"],
                                   "img_per_s": opts.batch_size / (r["median_ms"] / 1000.0),
                                   **ratio_metrics(r["samples_ms"], full), "load_avg_1min": load}
        rows.append(_row(opts, config, metrics))
        log(f"  {label:<28} {r['median_ms']:9.2f} ms/step (p90 {r['p90_ms']:.2f}), "
            f"{opts.batch_size / (r['median_ms'] / 1000.0):8.2f} img/s{ratio_text(metrics, 'step')}")
    return rows
