"""The architecture's promises, checked on the source and on a method defined here at test time:

* a method declares everything about itself: a new method written in one module (registered, with its own
  metric column and its own DDP need) is trained by the runner, shown in the Pareto table with its unit, and
  gets the DDP strategy it declares, with no edit anywhere else;
* the import graph of ``bench_suite``, ``methods`` and ``datamodules`` (imports at any depth, ``TYPE_CHECKING``
  blocks aside) has no cycle;
* the framework's core modules name no built-in method, in code or in strings;
* no module is over 500 lines unless it does one thing (listed here with the reason).
"""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import have_fashion_mnist
from tests.test_resume import run_cli, tiny_teacher  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench_suite", "methods", "datamodules")

# The framework's core: the runner and its parts, report, speed, store, training, measure, flops, cli,
# registry, backbones (and the other framework modules beside them). The paper reproduction
# (bench_suite/paper/) names the paper's methods by design; methods/ are the methods.
CORE = ("runner", "plan", "distributed", "locks", "options", "teacher", "checkpoints", "report", "pareto", "plots", "logs",
        "signals",
        "speed", "kernel_bench", "store", "training", "measure", "flops", "cli", "registry", "backbones", "errors",
        "versions", "kernels/__init__", "kernels/loader", "kernels/fused", "__init__", "__main__")

# Modules over 500 lines, each doing one thing.
LONG_MODULES = {
    "bench_suite/flops.py": "the fvcore counter: one handle per op family, the allowlist check and the closed forms "
                            "the tests compare against, which belong beside the handles they check",
    "methods/sparsifiner.py": "one method: Sparsifiner's timm adapter and LightningModule with its two-phase "
                              "schedule and documented deviations from the official code",
    "methods/dynamicvit.py": "one method: DynamicViT's prediction module, attention masking, timm adapter and "
                             "LightningModule with the official recipe (losses, learning rates, backbone freeze)",
    "methods/sparse_attention.py": "one algorithm: Sparsifiner's framework-free attention core (eq. 1-6), its "
                                   "predictor and the custom ops that make its sparse products countable",
}


# ----------------------------------------------------------------------------------------- import graph
def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every suite module ``name`` imports, at any depth (function bodies included), ``TYPE_CHECKING``
    blocks aside; importing ``a.b.c`` imports the packages ``a`` and ``a.b`` too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for target in targets:
            mod = resolve(target)
            if mod is None:
                continue
            found.add(mod)
            parts = mod.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return {m for m in found if m != name and not name.startswith(m + ".") and m in mods}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert graph["bench_suite.cli"] >= {"bench_suite.runner", "bench_suite.paper", "bench_suite.paper.run"}  # real imports seen
    assert _cycles(graph) == []


def test_framework_imports_no_method_and_the_registry_imports_none():
    mods = _modules()
    for name in mods:
        if name.startswith("bench_suite") and not name.startswith("bench_suite.paper"):
            assert not {m for m in _imports(name, mods[name], mods) if m.startswith("methods")}, name


# ----------------------------------------------------------------------------------------- method names
def _builtin_methods() -> list[str]:
    from bench_suite.registry import method_specs

    names = [s.name for s in method_specs() if s.source == "builtin"]
    assert {"full", "evit", "sparsifiner"} <= set(names)
    return names


def _mentions(source: str, names: list[str]) -> list[str]:
    """Where ``source`` names a method: a string constant (docstrings included) or an identifier that contains
    a method's name as a word (``_`` separates words), and any string equal to a name. Names that are also
    common words count only as a whole string: "full" (np.full, "full attention") and "topk" (torch.topk)."""
    generic = {"full", "topk"}
    words = [n for n in names if n not in generic]
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, words)) + r")(?![A-Za-z0-9])", re.I)
    hits = []
    for node in ast.walk(ast.parse(source)):
        texts = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.Name):
            texts.append(node.id)
        elif isinstance(node, ast.Attribute):
            texts.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            texts.append(node.name)
        elif isinstance(node, ast.arg):
            texts.append(node.arg)
        is_string = isinstance(node, ast.Constant)
        for text in texts:
            if (is_string and text.strip() in names) or pattern.search(text):
                hits.append(f"line {getattr(node, 'lineno', '?')}: {text[:60]!r}")
    return hits


def test_mention_finder_finds_names():
    names = ["full", "evit", "sparsif_evit", "sparsifiner"]
    assert _mentions('x = "full"\n', names) and _mentions("def run_sparsifiner(): pass\n", names)
    assert _mentions('"""Sparsifiner\'s paper."""\n', names) and _mentions("EViT = 1\n", names)
    assert not _mentions('"""full attention and the paper\'s FLOP rule."""\nx = full_ms\n', names)


@pytest.mark.parametrize("module", CORE)
def test_core_module_names_no_builtin_method(module: str):
    path = ROOT / "bench_suite" / f"{module}.py"
    assert path.is_file(), path
    assert _mentions(path.read_text(encoding="utf-8"), _builtin_methods()) == []


def test_no_module_over_500_lines_unless_it_does_one_thing():
    long = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > 500:
                long[str(path.relative_to(ROOT))] = n
    assert set(long) <= set(LONG_MODULES), long


# ----------------------------------------------------------------------------------------- a new method
PROBE_METHOD = textwrap.dedent('''
    """A method written at test time in this one module: full attention plus a gate parameter that no forward
    uses (so DDP must look for unused parameters), and its own metric with a Pareto-table column."""
    import torch
    from torch import nn

    from bench_suite.registry import Metric, register_method
    from methods.base import BenchModule


    @register_method("probe_method", keep_rates=(0.5,), description="test: a method defined at test time")
    class ProbeMethod(BenchModule):
        """Dense attention; reports how sharp its probe is and which DDP setting its Trainer had."""

        ddp_find_unused_parameters = True
        reported_metrics = (
            Metric("probe_sharpness", "widgets", column="probe_sharpness_pct", header="Probe sharpness (%)",
                   scale=100.0, decimals=1, description="a number only this method knows"),
            Metric("ddp_find_unused_seen", "flag"),
        )

        def __init__(self, backbone: nn.Module, keep_rate: float = 0.5, teacher: nn.Module | None = None,
                     **kwargs) -> None:
            super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, **kwargs)
            self.gate = nn.Parameter(torch.zeros(3))  # never used in a forward
            self.seen = -1.0

        def on_fit_start(self) -> None:
            kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
            self.seen = -1.0 if kwargs is None else float(bool(kwargs.get("find_unused_parameters")))

        def sparsity_report(self) -> dict[str, float]:
            return {"probe_sharpness": 0.25, "ddp_find_unused_seen": self.seen}
''')


@pytest.mark.slow
@pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")
def test_a_method_defined_in_one_module_runs_with_its_column_unit_and_ddp_need(tmp_path, tiny_teacher,
                                                                               registry_snapshot, monkeypatch):
    (tmp_path / "probe_plugin.py").write_text(PROBE_METHOD)
    wrapper = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import probe_plugin; "
               "from bench_suite.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "results"
    proc = run_cli([str(tmp_path), "run", "--profile", "tiny", "--methods", "probe_method", "--train-subset", "64",
                    "--batch-size", "32", "--accelerator", "cpu", "--devices", "1", "--strategy", "ddp",
                    "--teacher", str(tiny_teacher), "--no-progress", "--output", str(out)], tmp_path, wrapper=wrapper)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from bench_suite.pareto import pareto_table
    from bench_suite.store import ResultsStore

    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("probe_plugin")  # the plugin, installed here too: the report reads its declarations

    with ResultsStore(out / "results.sqlite") as store:
        rows = store.rows(profile="tiny")
    row = rows[rows.method == "probe_method"].iloc[0]
    assert row.status == "ok" and row.train_steps == 2  # the runner trained it
    assert row.units["probe_sharpness"] == "widgets" and row.units["top1"] == "%"  # its unit travels with the row
    assert row.ddp_find_unused_seen == 1.0  # the runner honoured its DDP need (strategy find_unused=True)
    table = pareto_table(rows)
    assert table.loc[table.method == "probe_method", "probe_sharpness_pct"].item() == pytest.approx(25.0)
    assert pd.isna(table.loc[table.method == "teacher", "probe_sharpness_pct"]).all()
    md = (out / "pareto_tiny_fashion_mnist.md").read_text(encoding="utf-8")
    assert "Probe sharpness (%)" in md and re.search(r"\|\s+25\.0\s+\|", md)
    assert "probe_sharpness_pct" in (out / "pareto_tiny_fashion_mnist.csv").read_text(encoding="utf-8")
