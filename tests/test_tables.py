"""The paper tables command (bench_suite.paper): closed-form FLOP rows at paper scale, paper numbers only
from the data file, top-1 only from the store, files and report page."""
from __future__ import annotations

import csv
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.test_outputs import _check_latex

from bench_suite.errors import DataFileError
from bench_suite.paper.data import DATA_FILE, load_paper_results, run_plan
from bench_suite.paper.run import make_tables
from bench_suite.paper.tables import HEADERS, TEXT_COLUMNS

# Rows whose FLOPs have closed forms: DeiT-S, EViT/DynamicViT 0.7 and 0.5, LV-ViT-S (Table 1), DeiT-T-384
# (Table 3), Linformer k = 68 (Table 4).
SUBSET = {(1, 1), (1, 2), (1, 3), (1, 6), (1, 7), (1, 10), (3, 1), (4, 1)}
PAPER_NUMBERS = ("paper_token_keep_rate", "paper_attn_keep_rate", "paper_att_num", "paper_mhsa_mflops",
                 "paper_overall_gflops", "paper_top1")


def dense(depth: int, n: int, dim: int) -> float:
    return depth * 2 * n * n * dim / 1e6


def paper_rule_deit_s(rho: float) -> float:
    """The paper's token-pruning count on DeiT-S: 4 dense layers, then 3, 3, 2 layers with k_s patches kept,
    per head k_s^2 + 197 (patch block plus the CLS row); 6 heads x head dim 64 x 2 products = 768."""
    k = [math.ceil(rho ** s * 196 - 1e-9) for s in (1, 2, 3)]
    return 768 * (4 * 197 ** 2 + 3 * (k[0] ** 2 + 197) + 3 * (k[1] ** 2 + 197) + 2 * (k[2] ** 2 + 197)) / 1e6


def executed(tokens_per_layer: list[int]) -> float:
    """Dense MHSA of DeiT-S on the tokens each layer really sees."""
    return sum(2 * n * n * 384 for n in tokens_per_layer) / 1e6


def evit_tokens(rho: float) -> list[int]:
    """EViT on DeiT-S: after blocks 3, 6, 9, N -> 1 + ceil(rho (N - 1)) + 1 (CLS, kept, fused)."""
    out, n = [], 197
    for layer in range(12):
        out.append(n)
        if layer in (3, 6, 9):
            n = 2 + math.ceil(rho * (n - 1) - 1e-9)
    return out


def dynamicvit_tokens(rho: float) -> list[int]:
    """DynamicViT on DeiT-S at inference: blocks 3-5, 6-8, 9-11 see 1 + int(196 rho^s) tokens."""
    return [197] * 3 + [1 + int(196 * rho ** s + 1e-9) for s in (1, 2, 3) for _ in range(3)]


def _perturbed_subset(path: Path) -> pd.DataFrame:
    """Copy the SUBSET rows of the real data file with every paper number changed (x1.5 + 0.25), so that a
    paper number typed into code could not pass."""
    raw = pd.read_csv(DATA_FILE, dtype=str, keep_default_na=False)
    keep = [(int(t), int(r)) in SUBSET for t, r in zip(raw["table"], raw["row"])]
    sub = raw[keep].copy()
    for col in PAPER_NUMBERS:
        sub[col] = [f"{float(v) * 1.5 + 0.25:.2f}" if v else "" for v in sub[col]]
    sub.to_csv(path, index=False)
    return sub


def _store_row(method: str, keep: float, seed: int, top1: float, hparams: dict, profile: str = "deit_s") -> dict:
    from bench_suite.store import config_key

    config = {"kind": "train", "method": method, "keep_rate": keep, "profile": profile, "seed": seed,
              "epochs": 1, "data": {"dataset": "fashion_mnist", "train_subset": 256}, "hparams": hparams}
    return {"key": config_key(config), "status": "ok", "method": method, "keep_rate": keep, "profile": profile,
            "dataset": "fashion_mnist", "seed": seed, "config": config,
            "metrics": {"top1": top1, "mhsa_mflops": 0.05 + keep / 100}, "units": {"top1": "%", "mhsa_mflops": "MFLOPs"},
            "versions": {}, "git": "test", "error": None}


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory):
    from bench_suite.backbones import PROFILES
    from bench_suite.plan import resolved_hparams
    from bench_suite.registry import get_method
    from bench_suite.store import ResultsStore

    tmp = tmp_path_factory.mktemp("tables")
    data_file = tmp / "paper_subset.csv"
    sub = _perturbed_subset(data_file)
    out = tmp / "results"
    with ResultsStore(out / "results.sqlite") as store:
        deit_s = PROFILES["deit_s"]  # what run stores on a paper profile: the defaults with the paper recipe
        evit = {k: v for k, v in resolved_hparams(get_method("evit"), 0.7, {}, deit_s).items() if k != "keep_rate"}
        full = get_method("full").defaults()
        store.put(_store_row("evit", 0.7, 0, 41.5, evit | {"keep_rate": 0.7}))
        store.put(_store_row("evit", 0.5, 0, 12.0, evit | {"keep_rate": 0.5, "lr": 1.0}))  # other settings
        store.put(_store_row("full", 1.0, 0, 60.0, full | {"keep_rate": 1.0}))
        store.put(_store_row("full", 1.0, 1, 62.0, full | {"keep_rate": 1.0}))
        # a proxy profile's results: never in the paper-scale rows, in a table of their own
        store.put(_store_row("full", 1.0, 0, 33.0, full | {"keep_rate": 1.0}, profile="tiny"))
        store.put(_store_row("evit", 0.7, 0, 77.0, get_method("evit").defaults() | {"keep_rate": 0.7}, profile="tiny"))
        # the same method without its paper recipe on deit_s: another configuration, not this row's result
        store.put(_store_row("evit", 0.7, 1, 5.0, get_method("evit").defaults() | {"keep_rate": 0.7}))
    run = make_tables(out, tables=[1, 3, 4], profile="tiny", data="fashion_mnist", figures=True, report=True,
                      data_file=data_file, workers=1, log=lambda _: None)
    return run, sub, out


def _row(run, table: int, row: int) -> pd.Series:
    f = run.tables[table].frame
    return f[f["paper_row"] == row].iloc[0]


def test_dense_rows_are_the_closed_forms(subset_run):
    run, _, _ = subset_run
    assert _row(run, 1, 1)["suite_mhsa_mflops"] == pytest.approx(dense(12, 197, 384), abs=1e-6)  # 357.66
    assert _row(run, 1, 10)["suite_mhsa_mflops"] == pytest.approx(dense(16, 197, 384), abs=1e-6)  # 476.88
    assert _row(run, 3, 1)["suite_mhsa_mflops"] == pytest.approx(dense(12, 577, 192), abs=1e-6)  # 1534.14
    assert round(dense(12, 197, 384), 2) == 357.66 and round(dense(12, 577, 192), 2) == 1534.14


def test_token_pruning_rows_under_the_paper_rule_and_measured(subset_run):
    run, _, _ = subset_run
    for row, rho, expected in ((2, 0.7, 193.09), (3, 0.7, 193.09), (6, 0.5, 149.05), (7, 0.5, 149.05)):
        got = _row(run, 1, row)["suite_mhsa_mflops_paper_rule"]
        assert got == pytest.approx(paper_rule_deit_s(rho), abs=1e-6)
        assert round(got, 2) == expected
    # measured: the tokens the modules really keep (EViT: +1 fused token after blocks 3, 6, 9; DynamicViT:
    # int(196 rho^s) patches from block 3, 6, 9 on)
    assert evit_tokens(0.7)[3:] == [197, 140, 140, 140, 100, 100, 100, 72, 72]
    for row, rho in ((2, 0.7), (6, 0.5)):
        assert _row(run, 1, row)["suite_mhsa_mflops"] == pytest.approx(executed(evit_tokens(rho)), abs=1e-6)
    for row, rho in ((3, 0.7), (7, 0.5)):
        assert _row(run, 1, row)["suite_mhsa_mflops"] == pytest.approx(executed(dynamicvit_tokens(rho)), abs=1e-6)
    assert round(executed(evit_tokens(0.7)), 2) == 195.38 and round(executed(dynamicvit_tokens(0.5)), 2) == 119.20


def test_linformer_row_and_overall_gflops_are_measured(subset_run):
    run, _, _ = subset_run
    assert _row(run, 4, 1)["suite_mhsa_mflops"] == pytest.approx(12 * 4 * 197 * 68 * 384 / 1e6, abs=1e-6)
    total = _row(run, 3, 1)["suite_total_gflops"]
    assert total > dense(12, 577, 192) / 1e3 + 12 * 577 * 12 * 192 ** 2 / 1e9  # MHSA + qkv/proj/MLP at least


def test_paper_columns_equal_the_data_file_and_suite_columns_do_not(subset_run):
    run, sub, _ = subset_run
    for (t, r), group in sub.groupby(["table", "row"]):
        data = group.iloc[0]
        got = _row(run, int(t), int(r))
        for col in PAPER_NUMBERS:
            if col in got.index:
                want = float(data[col]) if data[col] else float("nan")
                assert got[col] == pytest.approx(want, nan_ok=True), (t, r, col)
        assert got["paper_model"] == data["model"]
        suite, paper = got["suite_mhsa_mflops"], float(data["paper_mhsa_mflops"])
        assert suite != pytest.approx(paper, rel=1e-3)  # measured, not copied
        assert got["suite_vs_paper_mhsa_pct"] == pytest.approx(100 * (suite - paper) / paper)
    # the perturbed paper values make every row that published information determines a MISMATCH
    assert _row(run, 1, 1)["mhsa_check"] == "measured vs paper: MISMATCH"
    assert _row(run, 1, 2)["mhsa_check"] == "paper rule vs paper: MISMATCH"  # a token-pruning row: the paper's rule is compared
    assert _row(run, 3, 1)["overall_check"].startswith("measured vs paper: not reproducible")
    assert _row(run, 4, 1)["mhsa_check"].startswith("measured vs paper: not reproducible")
    md = run.tables[1].paths[0].read_text(encoding="utf-8")
    value = re.escape(sub.iloc[0]["paper_mhsa_mflops"])
    assert re.search(rf"\|\s*{value}\s*\|", md)  # printed as in the data file (2 decimals here)


def test_every_number_is_measured_or_the_papers(subset_run):
    run, _, _ = subset_run
    for n, res in run.tables.items():
        for col in res.frame.columns:
            if col in TEXT_COLUMNS:
                assert not pd.api.types.is_float_dtype(res.frame[col]), col
                continue
            assert pd.api.types.is_numeric_dtype(res.frame[col]), col
            assert col.startswith(("suite_", "paper_")), f"table {n}: column {col} is neither suite_ nor paper_"
        md, csv_path, tex = res.paths
        assert list(pd.read_csv(csv_path).columns) == list(res.frame.columns)
        header = md.read_text(encoding="utf-8").splitlines()[0]
        for h in (c.strip() for c in header.strip("|").split("|")):
            assert "[paper" in h or "[suite" in h or h.startswith("Δ") or "check" in h or h == "Suite configuration", h
        text = tex.read_text(encoding="utf-8")
        _check_latex(text, columns=len([c for c in header.strip().strip("|").split("|")]))  # booktabs, no "Table N:"
    for k, h in HEADERS.items():  # display headers say whose number it is (Δ: suite relative to paper)
        if k.startswith("paper_"):
            assert "[paper" in h, k
        elif k.endswith("_pct"):
            assert h.startswith("Δ") and "vs paper" in h, k
        elif k.startswith("suite_") and k != "suite_config":
            assert "[suite" in h, k


def test_top1_comes_from_the_store_with_matching_settings(subset_run):
    run, _, out = subset_run
    assert _row(run, 1, 2)["suite_top1"] == pytest.approx(41.5)  # EViT 0.7 on deit_s / fashion_mnist
    full = _row(run, 1, 1)
    assert full["suite_top1"] == pytest.approx(61.0) and full["suite_top1_runs"] == 2  # two seeds averaged
    other = _row(run, 1, 6)  # EViT 0.5 is stored only with another lr: not this row's result
    assert math.isnan(other["suite_top1"])
    assert other["suite_top1_command"] == (f"python -m bench_suite run --methods evit --keep-rates 0.5 --profile deit_s "
                                           f"--data fashion_mnist --output {out}")
    md = run.tables[1].paths[0].read_text(encoding="utf-8")
    assert "no result yet" in md and f"python -m bench_suite run --table 1 --profile deit_s" in md
    assert "own backbone profile (deit_s, lvvit_s), dataset fashion_mnist" in run.tables[1].caption


def test_each_row_takes_only_its_own_backbones_top1_and_proxies_get_their_own_table(subset_run):
    run, _, out = subset_run
    lvvit = _row(run, 1, 10)  # LV-ViT-S full attention: nothing on lvvit_s (deit_s's and tiny's full are not it)
    assert math.isnan(lvvit["suite_top1"]) and "--profile lvvit_s" in lvvit["suite_top1_command"]
    assert math.isnan(_row(run, 3, 1)["suite_top1"])  # DeiT-T-384: from deit_t384 only
    for res in run.tables.values():  # the tiny (proxy) values appear in no paper-scale row
        assert not res.frame["suite_top1"].isin([33.0, 77.0]).any()
    proxy = run.proxy[1].frame.set_index("suite_config")["suite_top1"]
    assert proxy["full keep 1"] == pytest.approx(33.0) and proxy["evit keep 0.7"] == pytest.approx(77.0)
    assert proxy.isna().sum() == len(proxy) - 2
    md = (out / "tables" / "table1_proxy_tiny_fashion_mnist.md").read_text(encoding="utf-8")
    assert "Top-1 (%) [suite, tiny / fashion_mnist]" in md and "not comparable" in md and "paper" in md
    assert "LV-ViT-S (lvvit_s)" in md and "DeiT-S (deit_s)" in md  # the rows each configuration stands for
    assert "Table 1 on tiny / fashion_mnist (proxy)" in (out / "report.html").read_text(encoding="utf-8")


def test_report_page_and_figures(subset_run):
    run, _, out = subset_run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Table 1" in html and "Table 4" in html and "[paper]" in html and "[suite]" in html
    names = {f.name: f for f in run.figures}
    assert names["figure4_paper"].paths and names["figure4_paper"].paths[0].is_file()
    assert names["figure4_suite_tiny_fashion_mnist"].paths[0].is_file()
    assert "tables/figure4_paper.png" in html
    missing = names["figure3_sparsifiner"].missing  # no checkpoints in this store: said, not drawn
    assert missing and "python -m bench_suite run --methods sparsifiner" in missing and missing in html
    assert (out / "report.md").read_text(encoding="utf-8").count("## Table") == 3


def test_cli_table4_in_process(tmp_path, capsys):
    from bench_suite.cli import main

    assert main(["tables", "--table", "4", "--output", str(tmp_path), "--profile", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "Linformer" in printed and "wrote" in printed
    frame = pd.read_csv(tmp_path / "tables" / "table4.csv")
    with open(DATA_FILE, newline="", encoding="utf-8") as f:
        paper = {int(r["row"]): r for r in csv.DictReader(f) if r["table"] == "4"}
    for _, r in frame.iterrows():
        assert r["paper_mhsa_mflops"] == float(paper[int(r["paper_row"])]["paper_mhsa_mflops"])
        assert r["paper_top1"] == float(paper[int(r["paper_row"])]["paper_top1"])
    lin, sp = frame.iloc[0], frame.iloc[1]
    assert lin["suite_mhsa_mflops"] == pytest.approx(12 * 4 * 197 * 68 * 384 / 1e6, abs=1e-6)
    # Sparsifiner, B = 68, n_down = 32: low-rank products + sparse attention (+ the measured sparse-sparse
    # product, zero when every coefficient is below tau as with random weights)
    base = 12 * 6 * (32 * 197 * 64 + 196 * 32 * 64 + 2 * 64 * (197 + 196 * 68)) / 1e6
    assert sp["suite_attention_budget"] == 68 and sp["suite_n_down"] == 32
    if sp["suite_coef_sparsity"] == 1.0:
        assert sp["suite_mhsa_mflops"] == pytest.approx(base, abs=1e-6)
    else:
        assert sp["suite_mhsa_mflops"] > base
    assert (tmp_path / "tables" / "table4.tex").is_file() and not (tmp_path / "report.html").exists()


def test_run_plan_and_data_file_checks(tmp_path):
    from bench_suite.errors import UserError
    from bench_suite.plan import resolve_plan

    plan1 = run_plan(1)
    for rho in (0.5, 0.7):  # Table 1's Sparsif-EViT rows (fused token) and Sparsifiner rows (official pruning)
        assert ("sparsif_evit", 0.25, {"token_keep_rate": rho, "token_pruning": "evit"}) in plan1
        assert ("sparsif_evit", 0.25, {"token_keep_rate": rho, "token_pruning": "official"}) in plan1
    assert ("evit", 0.7, {}) in plan1 and ("sparsifiner", 0.1, {}) in plan1
    assert len(plan1) == len(set((m, k, tuple(o.items())) for m, k, o in plan1)) == 12  # proxies left out
    assert run_plan(4) == [("linformer", 0.345, {}), ("sparsifiner", 0.345, {})]
    assert [k for m, k, _ in run_plan(2)] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]
    for t in (1, 2, 3, 4):
        assert len(resolve_plan(run_plan(t))) == len(run_plan(t))  # every override is a setting of the method
    with pytest.raises(UserError):
        run_plan(5)
    assert len(load_paper_results()) == 35
    bad = tmp_path / "bad.csv"
    text = DATA_FILE.read_text(encoding="utf-8")
    for broken in (text.replace(",evit,0.7,", ",no_such_method,0.7,", 1),
                   text.replace("1,2,EViT", "1,1,EViT", 1),
                   text.replace(",357.7,", ",357.7x,", 1),
                   text.replace(",357.7,", ",357.7,,", 1),  # one field too many
                   text.replace('{""token_keep_rate"": 0.7,', '{""no_such_setting"": 0.7,', 1)):
        assert broken != text
        bad.write_text(broken, encoding="utf-8")
        with pytest.raises(DataFileError):
            load_paper_results(bad)
    shutil.copy(DATA_FILE, bad)
    assert len(load_paper_results(bad)) == 35
