"""The one validation layer of the command line: the option types every subcommand declares (so that a bad
number is refused by the parser, before anything runs) and the parsers of the options that are text: keep-rate
lists, comma lists and ``--hparams`` (a JSON object from method name to that method's settings, for ``run`` and
``speed`` alike). Every function raises :class:`bench_suite.errors.UserError` with one line."""
from __future__ import annotations

import json
import math
import types
import typing
from typing import Any, Callable

from bench_suite.errors import UserError

from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt, restricted_number_type

__all__ = ["PositiveInt", "NonNegativeInt", "OpenUnitInterval", "KeepRate", "ClipValue", "PRECISIONS",
           "COMPILE_MODES", "TRAINING_DEFAULTS", "training_recipe", "parse_keep_rates", "parse_hparams", "parse_list", "parse_devices",
           "parse_loggers"]

KeepRate = restricted_number_type("KeepRate", float, [(">", 0.0), ("<=", 1.0)], join="and",
                                  docstring="a keep rate in (0, 1]")
"""Option type of a keep rate: a number in (0, 1] (NaN and infinities are refused)."""

ClipValue = restricted_number_type("ClipValue", float, [(">=", 0.0), ("<", math.inf)], join="and",
                                   docstring="a finite number >= 0")
"""Option type of ``--gradient-clip-val``: a finite number >= 0 (0: no clipping)."""

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
"""Lightning precisions ``run --precision`` accepts (``16-mixed`` needs a GPU)."""

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
"""``run --compile`` values: ``none`` (eager, the default) or a ``torch.compile`` mode."""

TRAINING_DEFAULTS = {"precision": "32", "accumulate_grad_batches": 1, "gradient_clip_val": 0.0, "compile": "none"}
"""Trainer settings of ``run`` and their defaults (fp32, no accumulation, no clipping, eager: no
``torch.compile``)."""


def training_recipe(cfg: Any) -> dict[str, Any]:
    """The Trainer settings of ``cfg`` (``--precision``, ``--accumulate-grad-batches``, ``--gradient-clip-val``,
    ``--compile``) that differ from :data:`TRAINING_DEFAULTS`, in canonical types: they enter every row's configuration key
    (under ``"trainer"``) and the Trainer; a run at the defaults keeps its earlier keys."""
    out: dict[str, Any] = {}
    for name, default in TRAINING_DEFAULTS.items():
        value = getattr(cfg, name, None)
        if value is None:
            continue
        value = type(default)(value)
        if value != default:
            out[name] = value
    return out


def parse_keep_rates(text: str | None) -> list[float] | None:
    """Parse ``--keep-rates 0.7,0.5``.

    Raises:
        UserError: for a value that is not a number in (0, 1].
    """
    if text is None or str(text).strip() == "":
        return None
    rates = []
    for part in str(text).split(","):
        try:
            r = float(part)
        except ValueError:
            raise UserError(f"keep rate {part.strip()!r} is not a number") from None
        if not 0.0 < r <= 1.0 or math.isnan(r):
            raise UserError(f"keep rate {r:g} is outside (0, 1]")
        rates.append(r)
    return rates


def parse_hparams(text: str | None, methods: Any) -> dict[str, dict[str, Any]]:
    """Parse ``--hparams '{"<method>": {"<setting>": value, ...}, ...}'``: a JSON object
    from method name to that method's settings (see ``list``). The settings go to the method's factory and
    into the configuration key, so a changed setting is a new configuration (a new row).

    Args:
        text: the JSON text (None or empty: no settings).
        methods: the names of the methods of this run.

    Raises:
        UserError: for invalid JSON (``NaN`` and ``Infinity`` included), a method that is not in this run, or
            settings that are not an object. (A setting the method does not take, or of the wrong type, is
            refused by :func:`canonical_settings`.)
    """
    if text is None or str(text).strip() == "":
        return {}

    def no_constant(name: str) -> Any:
        raise UserError(f"--hparams: {name} is not a number a setting can take (finite numbers only)")

    try:
        obj = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"--hparams is not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(obj, dict):
        raise UserError('--hparams must be a JSON object {"<method>": {"<setting>": value}}')
    names = sorted(set(methods))
    out: dict[str, dict[str, Any]] = {}
    for name, settings in obj.items():
        if name not in names:
            raise UserError(f"--hparams names method {name!r}, which is not in this run ({', '.join(names)})")
        if not isinstance(settings, dict):
            raise UserError(f'--hparams["{name}"] must be an object of settings, got {settings!r}')
        out[name] = dict(settings)
    return out


def parse_seeds(text: str | None) -> list[int] | None:
    """Parse ``--seeds 0,1,2`` (distinct non-negative integers, in the given order; ``None``/empty: ``None``).

    Raises:
        UserError: for an item that is not a non-negative integer, or a repeated seed.
    """
    seeds = parse_list(text, int, "--seeds")
    if seeds is None:
        return None
    if any(s < 0 for s in seeds) or not seeds:
        raise UserError(f"--seeds takes non-negative integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds repeats a seed: {text!r}")
    return seeds


def parse_list(text: str | None, kind: Callable[[str], Any], what: str) -> list[Any] | None:
    """Parse a comma-separated option (``None`` or empty: ``None``).

    Raises:
        UserError: for an item ``kind`` cannot convert.
    """
    if text is None or str(text).strip() == "":
        return None
    try:
        return [kind(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what}: cannot parse {text!r}") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _allowed(hint: Any) -> set[type]:
    """The plain types a type annotation admits (``int | None`` -> ``{int, NoneType}``)."""
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set().union(*(_allowed(a) for a in args))
    origin = typing.get_origin(hint)
    return {origin or hint} if isinstance(origin or hint, type) else set()


def canonical_settings(method: str, overrides: dict[str, Any], defaults: dict[str, Any],
                       hints: dict[str, Any] | None = None) -> dict[str, Any]:
    """One spelling of a method's settings, so that equal configurations get one key: a number takes the
    type of the setting's default (``1`` for a float setting is ``1.0``, ``2.0`` for an integer setting is
    ``2``), a list is a tuple where the default is one, and a setting equal to its default is left out (it is
    the default configuration, not a new one). Sorted by name.

    Args:
        method: the method's name (for messages).
        overrides: the settings given (``--hparams``, a table plan).
        defaults: the method's defaults (:meth:`bench_suite.registry.MethodSpec.defaults`).
        hints: the settings' type annotations (:meth:`~bench_suite.registry.MethodSpec.setting_types`): where
            the default is ``None``, an ``int`` setting takes ``4.0`` as ``4`` and a ``float`` one ``4`` as ``4.0``.

    Raises:
        UserError: for a setting the method does not take, a non-finite number, or a value whose type does
            not fit the default's (a number where the default is a number, a boolean where it is one; ``None``
            only where the annotation admits it).
    """
    out: dict[str, Any] = {}
    for name in sorted(overrides):
        value = overrides[name]
        if name not in defaults:
            raise UserError(f"{method}: {name} is not a setting of the method (settings: {', '.join(defaults)})")
        default = defaults[name]
        allowed = _allowed((hints or {}).get(name))
        if default is None and _number(value) and allowed & {int, float}:
            default = 0.0 if float in allowed else 0  # only the type matters below
        if _number(value) and not math.isfinite(value):
            raise UserError(f"{method}: {name} must be a finite number, got {value!r}")
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"{method}: {name} must be true or false, got {value!r}")
        if value is None and type(None) in allowed:  # an optional setting switched off (JSON null)
            pass
        elif _number(default) and not _number(value):
            raise UserError(f"{method}: {name} must be a number, got {value!r}")
        if isinstance(default, float) and _number(value):
            value = float(value)
        elif isinstance(default, int) and not isinstance(default, bool) and _number(value):
            if float(value) != int(value):
                raise UserError(f"{method}: {name} must be a whole number, got {value!r}")
            value = int(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if value == defaults[name] and type(value) is type(defaults[name]):
            continue
        out[name] = value
    return out


def parse_loggers(text: str | None) -> tuple[str, ...]:
    """``--logger csv,tensorboard`` -> ``("csv", "tensorboard")`` (``csv`` when empty is not allowed).

    Raises:
        UserError: for an empty list or a logger that is not ``csv`` or ``tensorboard``.
    """
    names = tuple(dict.fromkeys(n.strip() for n in str(text or "").split(",") if n.strip()))
    bad = [n for n in names if n not in ("csv", "tensorboard")]
    if bad or not names:
        raise UserError(f"--logger takes csv and/or tensorboard (comma-separated), got {text!r}")
    return names


def parse_devices(text: str) -> Any:
    """Lightning's ``devices`` from ``--devices``: ``"auto"``, a count (``-1``: all), or a comma list of ids.

    Raises:
        UserError: for anything else (zero, a negative count other than -1, a word).
    """
    text = str(text).strip()
    if text == "auto":
        return text
    try:
        if "," in text:
            ids = [int(t) for t in text.split(",") if t.strip()]
            if ids and all(i >= 0 for i in ids):
                return ids
        elif int(text) >= 1 or int(text) == -1:
            return int(text)
    except ValueError:
        pass
    raise UserError(f"--devices must be 'auto', a positive count, -1 (all) or a comma list of device ids, got "
                    f"{text!r}")
