"""Parsing of the options several subcommands share, in one format each: keep-rate lists, comma lists and
``--hparams`` (a JSON object from method name to that method's settings, for ``run`` and ``speed`` alike)."""
from __future__ import annotations

import json
import math
from typing import Any, Callable

from bench_suite.errors import UserError

__all__ = ["parse_keep_rates", "parse_hparams", "parse_list"]


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
        UserError: for invalid JSON, a method that is not in this run, or settings that are not an object.
            (A setting the method does not take is refused by :func:`resolve_plan`.)
    """
    if text is None or str(text).strip() == "":
        return {}
    try:
        obj = json.loads(text)
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
