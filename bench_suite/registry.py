"""The method registry: name -> LightningModule factory, in the spirit of timm's ``@register_model``.

The registry imports no method. Every method, built-in or not, is found through the entry-point group
``bench_suite.methods`` (the suite's own methods are entry points of the ``bench_suite`` distribution,
declared in its ``pyproject.toml``), loaded lazily the first time the registry is asked for a method or
the list of methods. An entry point may name a module (importing it registers its methods with
:func:`register_method`) or a factory/class (registered under the entry point's name). A plugin that
fails to import gives a warning that names it; the other methods still work.

A method declares everything about itself on its class (read through :class:`MethodSpec`), so that the
runner, the report, the speed benchmark and the tables name no method:

* ``reported_metrics``: the :class:`Metric` s its ``sparsity_report`` returns (unit, Pareto-table column,
  header, format);
* ``ddp_find_unused_parameters``: whether DDP must look for parameters unused in a step;
* ``reference``: the dense baseline (the teacher's evaluation and the speed ratios refer to it);
* ``in_default_run``: part of the sweep ``run`` does when no ``--methods`` is given;
* ``display_name``, ``plot_color`` / ``plot_marker``: its name, colour and marker in every plot;
  (these three only where the class itself declares them: a subclass does not inherit them)
* hooks of :class:`methods.base.BenchModule` (paper FLOP rule, timing set-up, attention maps).
"""
from __future__ import annotations

import inspect
import typing
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from bench_suite.errors import UnknownMethodError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Metric",
    "MethodSpec",
    "DuplicateMethodError",
    "UnknownMethodError",
    "register_method",
    "get_method",
    "list_methods",
    "method_specs",
    "parse_methods",
    "reference_method",
    "default_methods",
    "declared_metrics",
]

ENTRY_POINT_GROUP = "bench_suite.methods"


class DuplicateMethodError(ValueError):
    """Raised when a method name is registered twice."""


@dataclass(frozen=True)
class Metric:
    """A metric a method measures and reports (from its ``sparsity_report``), declared on the method's class.

    Attributes:
        name: the key in ``sparsity_report()`` and in the stored row's ``metrics``.
        unit: the stored value's unit (recorded with every row, e.g. ``"fraction"``, ``"keys per query row"``).
        column: the Pareto table column that shows it (``None``: stored, not shown in the table).
        header: the column's header, unit included (e.g. ``"Coef. sparsity (%)"``).
        scale: shown value = stored value x ``scale`` (100 shows a fraction as a percentage).
        decimals: decimals shown in the Markdown table (the CSV keeps full precision).
        description: one line for ``list``.
    """

    name: str
    unit: str
    column: str | None = None
    header: str | None = None
    scale: float = 1.0
    decimals: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.unit:
            raise ValueError(f"a metric needs a name and a unit, got {self.name!r}, {self.unit!r}")
        if self.column is not None and not self.header:
            raise ValueError(f"metric {self.name!r}: a table column needs a header (with its unit)")


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

    def _declared(self, name: str, default: Any, inherited: bool = True) -> Any:
        """A declaration of the factory; ``inherited=False``: only one its own class makes (a subclass of
        the dense reference is not the reference, and does not take its colour)."""
        if inherited or not inspect.isclass(self.factory):
            return getattr(self.factory, name, default)
        return vars(self.factory).get(name, default)

    @property
    def reported_metrics(self) -> tuple[Metric, ...]:
        """The method's declared :class:`Metric` s (class attribute ``reported_metrics``; none by default)."""
        return tuple(self._declared("reported_metrics", ()))

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters unused in a step (class attribute of that name)."""
        return bool(self._declared("ddp_find_unused_parameters", False))

    @property
    def fine_tunes(self) -> bool:
        """Whether the runner fine-tunes it (class attribute ``fine_tune``, default True); False: the method is
        applied to the teacher and only evaluated (e.g. a training-free method's off-the-shelf setting)."""
        return bool(self._declared("fine_tune", True, inherited=False))

    @property
    def paper_recipe(self) -> dict[str, Any]:
        """The method's fine-tuning recipe at paper scale (class attribute ``paper_recipe``, inherited: ``epochs``
        and method settings, e.g. the official learning rates), used by ``run`` on the profiles that run the
        paper's protocol (:attr:`bench_suite.backbones.Profile.paper_recipes`); ``{}``: the profile's protocol."""
        return dict(self._declared("paper_recipe", {}) or {})

    @property
    def reference(self) -> bool:
        """Whether this is the dense baseline every ratio and the teacher's evaluation refer to."""
        return bool(self._declared("reference", False, inherited=False))

    @property
    def in_default_run(self) -> bool:
        """Whether ``run`` sweeps it when no ``--methods`` is given."""
        return bool(self._declared("in_default_run", False, inherited=False))

    @property
    def display_name(self) -> str:
        """The name plots and tables show (class attribute ``display_name``, its own class only; else ``name``)."""
        return str(self._declared("display_name", None, inherited=False) or self.name)

    @property
    def plot_style(self) -> tuple[str | None, str | None]:
        """``(colour, marker)`` the method declares for plots (``plot_color``, ``plot_marker``; None: assigned)."""
        return self._declared("plot_color", None, inherited=False), self._declared("plot_marker", None, inherited=False)

    def accepts(self, setting: str) -> bool:
        """Whether the factory takes the keyword ``setting`` (a typed ``__init__`` argument, base classes
        included through ``**kwargs``)."""
        out: set[str] = set()
        for target in self._init_chain():
            out |= {p.name for p in inspect.signature(target).parameters.values()
                    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
        return setting in out

    def _init_chain(self) -> list[Callable[..., Any]]:
        """The ``__init__`` signatures a call goes through, following ``**kwargs`` up the class hierarchy."""
        targets = [c.__init__ for c in self.factory.__mro__ if "__init__" in vars(c)] \
            if inspect.isclass(self.factory) else [self.factory]
        chain = []
        for target in targets:
            chain.append(target)
            if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values()):
                break
        return chain

    def setting_types(self) -> dict[str, Any]:
        """Setting name -> its type annotation (``typing.get_type_hints`` of the ``__init__`` chain; settings
        whose annotation cannot be resolved are left out)."""
        out: dict[str, Any] = {}
        for target in self._init_chain():
            try:
                hints = typing.get_type_hints(target)
            except Exception:  # noqa: BLE001 - an unresolvable annotation: that method's settings go untyped
                continue
            for name, hint in hints.items():
                out.setdefault(name, hint)
        return out

    def defaults(self) -> dict[str, Any]:
        """Default hyperparameters, read from the factory's typed signature (the config), following
        ``**kwargs`` up the class hierarchy so that base-class settings are listed too."""
        out: dict[str, Any] = {}
        for target in self._init_chain():
            for p in inspect.signature(target).parameters.values():
                if p.name in ("self", "backbone", "teacher") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if p.default is not inspect.Parameter.empty:
                    out.setdefault(p.name, p.default)
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


def load_plugins(force: bool = False) -> None:
    """Import the ``bench_suite.methods`` entry points once (lazily): the suite's own methods and the plugins.
    Failures become warnings; a suite that is not installed (no entry points at all) says so once."""
    global _plugins_loaded, _loading_source
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    eps = entry_points(group=ENTRY_POINT_GROUP)
    if not any(_is_builtin(ep) for ep in eps):
        warnings.warn("bench_suite is not installed (no entry points of its own): its methods are found through "
                      "the entry-point group 'bench_suite.methods'; run 'pip install -e .' in its folder",
                      RuntimeWarning, stacklevel=2)
    for ep in eps:
        if ep.name in _REGISTRY:
            continue
        _loading_source = "builtin" if _is_builtin(ep) else f"plugin {ep.name} ({ep.value})"
        try:
            obj = ep.load()
            if ep.name not in _REGISTRY and callable(obj) and not inspect.ismodule(obj):
                register_method(ep.name, keep_rates=getattr(obj, "default_keep_rates", (1.0,)))(obj)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the suite
            warnings.warn(f"bench_suite plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        finally:
            _loading_source = None


def _is_builtin(ep: Any) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and str(dist.metadata["Name"]).replace("-", "_").lower() == "bench_suite"


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


def reference_method() -> MethodSpec:
    """The registered dense baseline (the method whose class sets ``reference = True``).

    Raises:
        UnknownMethodError: if no registered method, or more than one, declares itself the reference.
    """
    refs = [spec for spec in method_specs() if spec.reference]
    if len(refs) != 1:
        raise UnknownMethodError(f"exactly one method must declare itself the dense reference "
                                 f"(reference = True); found {', '.join(s.name for s in refs) or 'none'}")
    return refs[0]


def default_methods() -> list[MethodSpec]:
    """The methods ``run`` sweeps when no ``--methods`` is given (``in_default_run = True``), reference first.

    Raises:
        UnknownMethodError: if no registered method declares itself part of the default run.
    """
    specs = sorted((s for s in method_specs() if s.in_default_run), key=lambda s: (not s.reference, s.name))
    if not specs:
        raise UnknownMethodError("no registered method declares itself part of the default run; name --methods")
    return specs


def declared_metrics(names: Any = None) -> dict[str, Metric]:
    """Metric name -> :class:`Metric` declared by the methods ``names`` (all registered ones by default);
    methods that are not registered (a store written with a plugin since uninstalled) contribute nothing.

    Raises:
        ValueError: if two methods declare one metric name with different units.
    """
    load_plugins()
    specs = [_REGISTRY[n] for n in (sorted(_REGISTRY) if names is None else names) if n in _REGISTRY]
    out: dict[str, Metric] = {}
    for spec in specs:
        for m in spec.reported_metrics:
            if m.name in out and out[m.name].unit != m.unit:
                raise ValueError(f"metric {m.name!r} is declared in {out[m.name].unit!r} and in {m.unit!r} "
                                 f"(method {spec.name!r})")
            out.setdefault(m.name, m)
    return out
