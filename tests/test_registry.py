"""The method registry: decorator, duplicates, unknown names, entry-point plugins."""
from __future__ import annotations

import sys
import textwrap
import warnings

import pytest

from bench_suite.registry import (DuplicateMethodError, UnknownMethodError, get_method, list_methods,
                                  parse_methods, register_method)


def test_builtin_methods_registered():
    names = list_methods()
    assert {"full", "evit"} <= set(names)
    assert names == sorted(names)


def test_register_and_duplicate(registry_snapshot):
    @register_method("dummy_method", keep_rates=(0.5,))
    class Dummy:
        def __init__(self, backbone, keep_rate: float = 0.5, teacher=None, alpha: float = 2.0):
            pass

    spec = get_method("dummy_method")
    assert spec.factory is Dummy and spec.keep_rates == (0.5,)
    assert spec.defaults() == {"keep_rate": 0.5, "alpha": 2.0}
    with pytest.raises(DuplicateMethodError, match="dummy_method"):
        register_method("dummy_method")(Dummy)


def test_bad_keep_rates_rejected(registry_snapshot):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        register_method("bad_rates", keep_rates=(1.5,))


def test_unknown_method_lists_known_names():
    with pytest.raises(UnknownMethodError) as info:
        parse_methods("full,nope,evit")
    msg = str(info.value)
    assert "'nope'" in msg and "full" in msg and "evit" in msg


def test_parse_methods_keeps_order_and_drops_repeats():
    assert [s.name for s in parse_methods("evit, full,evit")] == ["evit", "full"]


def _write_plugin(root, dist: str, module: str, body: str, ep_name: str, ep_value: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[bench_suite.methods]\n{ep_name} = {ep_value}\n")


def test_entry_point_plugins(tmp_path, registry_snapshot, monkeypatch):
    good = """
        from bench_suite.registry import register_method
        from methods.full import FullAttention

        @register_method("plugin_full", keep_rates=(1.0,), description="a plugin")
        class PluginFull(FullAttention):
            pass
    """
    _write_plugin(tmp_path, "good_plugin", "good_plugin_mod", good, "plugin_full", "good_plugin_mod")
    _write_plugin(tmp_path, "broken_plugin", "broken_plugin_mod", "raise ImportError('missing dep xyz')\n",
                  "broken", "broken_plugin_mod")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry_snapshot._plugins_loaded = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = list_methods()
    assert "plugin_full" in names and "full" in names
    assert get_method("plugin_full").source.startswith("plugin plugin_full")
    msgs = [str(w.message) for w in caught]
    assert any("'broken'" in m and "missing dep xyz" in m for m in msgs), msgs
    sys.modules.pop("good_plugin_mod", None)


def test_reference_default_run_and_plot_style_are_not_inherited(registry_snapshot):
    from bench_suite.registry import default_methods, get_method, reference_method
    from methods.full import FullAttention

    @register_method("full_variant", keep_rates=(1.0,))
    class FullVariant(FullAttention):
        pass

    spec = get_method("full_variant")
    assert not spec.reference and not spec.in_default_run and spec.plot_style == (None, None)
    assert reference_method().name == "full" and "full_variant" not in [s.name for s in default_methods()]
    assert get_method("sparsif_evit").ddp_find_unused_parameters  # inherited declarations still apply
