"""The method registry: name -> LightningModule factory, in the spirit of timm's ``@register_model``.

Built-in methods register themselves when :mod:`methods` is imported. Outside packages add methods
through the entry-point group ``bench_suite.methods``; those are loaded lazily, the first time the
registry is asked for a method or the list of methods. An entry point may name a module (importing it
registers its methods with :func:`register_method`) or a factory/class (registered under the entry
point's name). A plugin that fails to import gives a warning that names it; the other methods still
work.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

__all__ = [
    "ENTRY_POINT_GROUP",
    "MethodSpec",
    "DuplicateMethodError",
    "UnknownMethodError",
    "register_method",
    "get_method",
    "list_methods",
    "method_specs",
    "parse_methods",
]

ENTRY_POINT_GROUP = "bench_suite.methods"


class DuplicateMethodError(ValueError):
    """Raised when a method name is registered twice."""


class UnknownMethodError(KeyError):
    """Raised for a method name that no built-in method or plugin registered; lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line
        return str(self.args[0])


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the name used on the command line (``--methods``).
        factory: callable ``factory(backbone, keep_rate=..., teacher=..., **hparams)`` returning a
            :class:`methods.base.BenchModule` (usually the LightningModule class itself).
        keep_rates: the default keep-rate grid the runner sweeps.
        description: one line for ``python -m bench_suite list``.
        source: where it came from (``builtin`` or the plugin's entry point).
    """

    name: str
    factory: Callable[..., Any]
    keep_rates: tuple[float, ...]
    description: str = ""
    source: str = "builtin"

    def defaults(self) -> dict[str, Any]:
        """Default hyperparameters, read from the factory's typed signature (the config), following
        ``**kwargs`` up the class hierarchy so that base-class settings are listed too."""
        targets = [c.__init__ for c in self.factory.__mro__ if "__init__" in vars(c)] \
            if inspect.isclass(self.factory) else [self.factory]
        out: dict[str, Any] = {}
        for target in targets:
            params = inspect.signature(target).parameters.values()
            for p in params:
                if p.name in ("self", "backbone", "teacher") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if p.default is not inspect.Parameter.empty:
                    out.setdefault(p.name, p.default)
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
        return out


_REGISTRY: dict[str, MethodSpec] = {}
_plugins_loaded = False
_loading_source: str | None = None


def register_method(
    name: str, *, keep_rates: tuple[float, ...] = (1.0,), description: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class/function decorator registering a method factory under ``name``.

    Args:
        name: unique method name (lower case, no commas).
        keep_rates: default keep-rate grid for the runner; every rate must lie in (0, 1].
        description: one line shown by ``python -m bench_suite list``.

    Raises:
        DuplicateMethodError: if ``name`` is already registered.
        ValueError: for a malformed name or a keep rate outside (0, 1].
    """
    if not name or "," in name or name != name.strip():
        raise ValueError(f"invalid method name {name!r}")
    bad = [r for r in keep_rates if not 0.0 < float(r) <= 1.0]
    if bad or not keep_rates:
        raise ValueError(f"method {name!r}: keep rates must lie in (0, 1], got {keep_rates}")

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise DuplicateMethodError(
                f"method {name!r} is already registered (by {_REGISTRY[name].source}); names must be unique"
            )
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[name] = MethodSpec(name, factory, tuple(float(r) for r in keep_rates), doc,
                                     _loading_source or "builtin")
        return factory

    return deco


def _load_builtin() -> None:
    import methods  # noqa: F401  (registers the built-in methods)


def load_plugins(force: bool = False) -> None:
    """Import the ``bench_suite.methods`` entry points once (lazily). Failures become warnings."""
    global _plugins_loaded, _loading_source
    _load_builtin()
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY and _REGISTRY[ep.name].source != "builtin":
            continue
        _loading_source = f"plugin {ep.name} ({ep.value})"
        try:
            obj = ep.load()
            if ep.name not in _REGISTRY and callable(obj) and not inspect.ismodule(obj):
                register_method(ep.name, keep_rates=getattr(obj, "default_keep_rates", (1.0,)))(obj)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the suite
            warnings.warn(f"bench_suite plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        finally:
            _loading_source = None


def list_methods() -> list[str]:
    """Names of all registered methods (built-in and plugins), sorted."""
    load_plugins()
    return sorted(_REGISTRY)


def method_specs() -> list[MethodSpec]:
    """All registered :class:`MethodSpec` objects, sorted by name."""
    load_plugins()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def get_method(name: str) -> MethodSpec:
    """Look up a method.

    Raises:
        UnknownMethodError: if no method of that name is registered; the message lists the known ones.
    """
    load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def parse_methods(text: str | list[str]) -> list[MethodSpec]:
    """Parse ``--methods a,b`` into specs, keeping order and dropping repeats.

    Raises:
        UnknownMethodError: naming every unknown method and listing the known ones.
    """
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    load_plugins()
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise UnknownMethodError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known methods: {', '.join(sorted(_REGISTRY))}"
        )
    if not names:
        raise UnknownMethodError(f"no method given; known methods: {', '.join(sorted(_REGISTRY))}")
    return [_REGISTRY[n] for n in dict.fromkeys(names)]
