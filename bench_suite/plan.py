"""Planning a ``run`` before anything is trained or written: its resolved options, the configurations of
the sweep (method, keep rate, settings), their validation against the profile, the data and the output.

Everything here raises :class:`bench_suite.errors.UserError` (or a subclass) with one line for bad input.
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

from bench_suite.backbones import create_backbone, get_profile, num_tokens
from bench_suite.errors import UserError
from bench_suite.kernels import load_kernel
from bench_suite.options import canonical_settings, parse_loggers, parse_seeds, training_recipe
from bench_suite.registry import MethodSpec, get_method
from bench_suite.store import canonical_json
from bench_suite.training import TrainSettings
from datamodules import create_datamodule

__all__ = ["RunOptions", "make_datamodule", "train_settings", "resolve_plan", "validate_plan", "train_config",
           "setup_data", "check_data_dir", "check_output"]


def make_datamodule(cfg: Any, train_subset: int | None = None, batch_size: int | None = None):
    """The datamodule for ``cfg.data`` at the profile's resolution and channels; ``--val-size``,
    ``--num-workers`` and ``--augmentation`` where given, and the profile's timm model (whose pretrained data
    configuration gives the evaluation transform) to datamodules that take them.

    Raises:
        UserError: for ``--augmentation`` that is not a JSON object, or one given for data without that setting.
    """
    import inspect

    from datamodules import DATAMODULES

    p = get_profile(cfg.profile)
    defaults = p.run_defaults()
    extra: dict[str, Any] = {}
    if getattr(cfg, "val_size", None):
        extra["val_size"] = int(cfg.val_size)
    raw = getattr(cfg, "augmentation", None)
    if raw:
        try:
            augmentation = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"--augmentation is not valid JSON: {e.msg} (at character {e.pos})") from None
        if not isinstance(augmentation, dict):
            raise UserError('--augmentation must be a JSON object, e.g. \'{"mixup": 0.0}\'')
        extra["augmentation"] = augmentation
    cls = DATAMODULES.get(cfg.data)
    accepted = set(inspect.signature(cls.__init__).parameters) if cls is not None else set()
    if "augmentation" in extra and "augmentation" not in accepted:
        raise UserError(f"--augmentation is a setting of ImageFolder data, not of --data {cfg.data}")
    if "model_name" in accepted:
        extra["model_name"] = p.model
    return create_datamodule(cfg.data, data_dir=cfg.data_dir, img_size=p.img_size, in_chans=p.in_chans,
                             batch_size=batch_size or defaults["batch_size"], train_subset=train_subset,
                             num_workers=getattr(cfg, "num_workers", None), split_seed=0,
                             augment=not getattr(cfg, "no_augment", False), **extra)


def train_settings(cfg: Any, epochs: int) -> TrainSettings:
    every = getattr(cfg, "checkpoint_every", None)
    return TrainSettings(epochs=epochs, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                         accelerator=cfg.accelerator, progress=not cfg.no_progress, seed=int(cfg.seed),
                         loggers=parse_loggers(getattr(cfg, "logger", "csv")),
                         checkpoint_every_n_steps=TrainSettings.checkpoint_every_n_steps if every is None
                         else (int(every) or None), extra=training_recipe(cfg))


def check_output(output: Path) -> None:
    """Make sure ``output`` is a folder this process can write (created if missing, a probe file written and
    removed).

    Raises:
        UserError: naming the folder and the reason.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write_test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {output} is not writable: {e.strerror or e}") from None


class RunOptions:
    """Resolved options of one ``run`` invocation (see :func:`run_benchmark`)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.profile = get_profile(cfg.profile)
        defaults = self.profile.run_defaults()
        self.epochs = defaults["epochs"] if cfg.epochs is None else int(cfg.epochs)
        subset = defaults["train_subset"] if cfg.train_subset is None else int(cfg.train_subset)
        self.train_subset = subset or None
        self.batch_size = cfg.batch_size or defaults["batch_size"]
        self.output = Path(cfg.output)
        self.seed = int(cfg.seed)
        # fine-tuning seeds (--seeds): each configuration is trained once per seed, all from the teacher of --seed
        self.seeds = parse_seeds(getattr(cfg, "seeds", None)) or [self.seed]
        if self.epochs < 0:
            raise UserError(f"--epochs must be >= 0, got {self.epochs}")


def method_recipe(spec: MethodSpec, profile: Any) -> dict[str, Any]:
    """``spec``'s paper recipe (``{"epochs": ..., <setting>: ...}``, :attr:`MethodSpec.paper_recipe`) on a
    profile that runs the paper's protocol (``profile.paper_recipes``); ``{}`` elsewhere (the CPU profiles share
    one short protocol) or for a method without one."""
    if profile is None or not getattr(profile, "paper_recipes", False):
        return {}
    return spec.paper_recipe


def recipe_settings(spec: MethodSpec, profile: Any) -> dict[str, Any]:
    """The method settings of :func:`method_recipe` (without ``epochs``)."""
    return {k: v for k, v in method_recipe(spec, profile).items() if k != "epochs"}


def recipe_epochs(spec: MethodSpec, profile: Any, epochs: int, given: bool) -> int:
    """Fine-tuning epochs of ``spec``: ``epochs`` when ``--epochs`` was ``given`` or the method has no paper recipe
    on ``profile``, else the recipe's; 0 for a method that is evaluated only."""
    if not spec.fine_tunes:
        return 0
    recipe = method_recipe(spec, profile)
    return int(epochs) if given or "epochs" not in recipe else int(recipe["epochs"])


def resolve_plan(plan: Any, profile: Any = None) -> list[tuple[MethodSpec, float, dict[str, Any]]]:
    """Normalise plan entries ``(method, keep_rate)`` or ``(method, keep_rate, overrides)`` into
    ``(spec, keep_rate, overrides)``; ``method`` is a name or a :class:`MethodSpec`, ``overrides`` a dict of
    hyperparameters for the method's factory (e.g. a second keep rate), in their one canonical spelling
    (:func:`bench_suite.options.canonical_settings`: settings equal to the default, the method's paper recipe on
    ``profile`` included, left out; numbers of the default's type), so that equal configurations get one key.
    Repeats are dropped.

    Raises:
        UnknownMethodError: for an unknown method name.
        UserError: for a keep rate outside (0, 1], an override the method's factory does not take, or one
            of the wrong type.
    """
    out, seen = [], set()
    for entry in plan:
        if len(entry) not in (2, 3):
            raise UserError(f"plan entries are (method, keep_rate[, overrides]), got {entry!r}")
        method, rate = entry[0], float(entry[1])
        overrides = dict(entry[2] or {}) if len(entry) == 3 else {}
        spec = method if isinstance(method, MethodSpec) else get_method(str(method))
        if not 0.0 < rate <= 1.0 or rate != rate:
            raise UserError(f"plan entry {spec.name}: keep rate {rate:g} is outside (0, 1]")
        defaults = {k: v for k, v in (spec.defaults() | recipe_settings(spec, profile)).items() if k != "keep_rate"}
        overrides = canonical_settings(spec.name, overrides, defaults, spec.setting_types())
        ident = (spec.name, rate, canonical_json(overrides))
        if ident not in seen:
            seen.add(ident)
            out.append((spec, rate, overrides))
    return out


def resolved_hparams(spec: MethodSpec, rate: float, overrides: dict[str, Any], profile: Any = None) -> dict[str, Any]:
    """Every setting of one configuration: the method's defaults, its paper recipe on ``profile``, the
    overrides, the keep rate (what ``run`` stores as ``config["hparams"]`` and the tables match on)."""
    return spec.defaults() | recipe_settings(spec, profile) | dict(overrides) | {"keep_rate": float(rate)}


def train_config(spec: MethodSpec, rate: float, overrides: dict[str, Any], base: dict[str, Any],
                 epochs: int, profile: Any = None) -> dict[str, Any]:
    """The stored configuration of one fine-tuning row; its :func:`bench_suite.store.config_key` is the row's
    key. ``overrides`` must be canonical (:func:`resolve_plan`): then every spelling of one configuration gives
    one key. ``base`` holds what the sweep shares (profile, data and its fingerprint, seed, teacher). On a paper
    profile the method's recipe enters the settings (``hparams``) and is recorded (``recipe``)."""
    config = {"kind": "train", "method": spec.name, "keep_rate": float(rate), **base, "epochs": int(epochs),
              "hparams": resolved_hparams(spec, rate, overrides, profile)}
    recipe = method_recipe(spec, profile)
    if recipe:
        config["recipe"] = {"name": "paper", **recipe}
    if overrides:  # the settings that differ from the method's defaults label the row in tables and plots
        config["overrides"] = dict(overrides)
    return config


def check_data_dir(data_dir: str | Path | None) -> None:
    """A given ``--data-dir`` must be an existing, non-empty folder (``None``: the dataset's default places).

    Raises:
        UserError: naming the folder and what is wrong with it.
    """
    if data_dir is None:
        return
    d = Path(data_dir)
    if not d.exists():
        raise UserError(f"data folder {d} does not exist")
    if not d.is_dir():
        raise UserError(f"data folder {d} is not a folder")
    if not any(d.iterdir()):
        raise UserError(f"data folder {d} is empty")


def setup_data(cfg: Any, dm) -> None:
    """Load the data now (before anything is trained or written) and check it is what the user named.

    Raises:
        UserError: if ``--data-dir`` is missing, not a folder, empty, or (Fashion-MNIST) holds no data
            while another copy would silently be used instead.
        DataError: for corrupt or incomplete files (from the datamodule).
    """
    check_data_dir(cfg.data_dir)
    dm.setup()
    paths = getattr(dm, "paths", None)
    if cfg.data_dir is not None and isinstance(paths, dict):
        root = Path(cfg.data_dir).resolve()
        outside = [str(p) for p in paths.values() if not Path(p).resolve().is_relative_to(root)]
        if outside:
            raise UserError(f"data folder {cfg.data_dir} holds no {cfg.data} files (it would fall back to "
                              f"{Path(outside[0]).parent}); fix --data-dir or leave it out")


def validate_plan(plan: list[tuple[MethodSpec, float, dict[str, Any]]], profile, num_classes: int = 10,
                  skip_infeasible: bool = False, log=print) -> list[tuple[MethodSpec, float, dict[str, Any]]]:
    """Check every configuration before anything is trained: its keep rate leaves at least one token of
    the profile's ``N`` (``keep_rate * N >= 1``: the budget rule ``ceil(rho N)`` must not round a
    vanishing budget up to a whole token, which would store a row under a keep rate it did not have),
    and its module can be built (the method's own checks run on a fresh backbone of the profile).

    Args:
        skip_infeasible: drop configurations that keep fewer than one token (logging each) instead of
            raising.

    Returns:
        The plan (without the dropped configurations).

    Raises:
        UserError: naming the configuration and what is wrong.
        KernelBuildError: a configuration asks for the compiled kernels (``attention_impl="cpp"``) and they
            cannot be built here.
    """
    reference = create_backbone(profile, num_classes=num_classes)
    n = num_tokens(reference)
    kept = []
    for spec, rate, overrides in plan:
        if rate * n < 1.0:
            why = (f"{spec.name}: keep rate {rate:g} keeps {rate * n:.3g} of the {n} tokens of profile "
                   f"{profile.name!r}, fewer than one")
            if skip_infeasible:
                log(f"{why}: left out")
                continue
            smallest = math.ceil(1e4 / n) / 1e4  # rounded up, so that it keeps one token itself
            raise UserError(f"{why}; the smallest keep rate here is 1/{n} (e.g. {smallest:g})")
        kept.append((spec, rate, overrides))
        try:
            spec.factory(copy.deepcopy(reference), keep_rate=rate, teacher=None,
                         **(recipe_settings(spec, profile) | overrides))
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(f"{spec.name} at keep rate {rate:g}"
                              + "".join(f", {k}={v!r}" for k, v in overrides.items())
                              + f" cannot be built on profile {profile.name!r}: {str(e).splitlines()[0]}") from None
    if not kept:
        raise UserError(f"no configuration of the plan fits profile {profile.name!r} ({n} tokens)")
    if any((spec.defaults() | overrides).get("attention_impl") == "cpp" for spec, _, overrides in kept):
        load_kernel()  # an explicit "cpp" must be buildable now (KernelBuildError, one line), not after training
    return kept
