"""Tests of the Pareto tables and plots (bench_suite.report), on synthetic rows made here."""
from __future__ import annotations

import random
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Text

from bench_suite.errors import ReportError
from bench_suite.pareto import X_AXES, pareto_front, pareto_table, summary_text, write_table
from bench_suite.plots import method_palette, pareto_figure, plot_pareto
from bench_suite.report import write_report
from bench_suite.store import ResultsStore, config_key

# (method, keep rate, measured MHSA MFLOPs, top-1 %): sparsifiner dominates evit at equal FLOPs,
# full is the most accurate, evit@0.5 is the cheapest.
POINTS = [("full", 1.0, 0.07398, 82.0), ("evit", 0.5, 0.02, 70.0), ("evit", 0.7, 0.04, 74.0),
          ("sparsifiner", 0.7, 0.04, 76.0), ("sparsifiner", 0.9, 0.06, 81.0), ("dynamicvit", 0.7, 0.05, 75.0)]
FRONT = {("full", 1.0), ("evit", 0.5), ("sparsifiner", 0.7), ("sparsifiner", 0.9)}


def make_row(method, keep_rate, mflops, top1, profile="tiny", dataset="fashion_mnist", status="ok", seed=0):
    config = {"method": method, "keep_rate": keep_rate, "profile": profile, "dataset": dataset, "seed": seed}
    metrics = {"top1": top1, "mhsa_mflops": mflops, "mhsa_mflops_paper": mflops * 1.1 if method != "full" else mflops,
               "total_gflops": 0.5 + mflops, "img_per_s": 5000.0 / (1 + 10 * mflops),
               "latency_ms_median": 2.0 + 30 * mflops, "peak_mib": 100.0}
    units = {"top1": "%", "mhsa_mflops": "MFLOPs", "mhsa_mflops_paper": "MFLOPs", "total_gflops": "GFLOPs",
             "img_per_s": "img/s", "latency_ms_median": "ms", "peak_mib": "MiB"}
    return {"key": config_key(config), "status": status, "method": method, "keep_rate": keep_rate,
            "profile": profile, "dataset": dataset, "seed": seed, "config": config,
            "metrics": metrics if status == "ok" else {k: None for k in metrics}, "units": units,
            "versions": {"torch": "2.14.1"}, "git": "0123456789ab", "error": None if status == "ok" else "boom"}


@pytest.fixture
def store_dir(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for p in POINTS:
            store.put(make_row(*p))
        store.put(make_row("linformer", 0.3, 0.01, None, status="failed"))
        for p in POINTS[:3]:  # a second group
            store.put(make_row(*p, profile="mini"))
    return tmp_path


def rows_of(store_dir, **filters):
    with ResultsStore(store_dir / "results.sqlite") as store:
        return store.rows(**filters)


# ------------------------------------------------------------------ pareto_front

def test_pareto_front_hand_made_points_with_ties_and_nan():
    df = pd.DataFrame({
        "mhsa_mflops": [1.0, 2.0, 2.0, 3.0, 1.0, np.nan, 4.0, 5.0, 0.5],
        "top1":        [70., 75., 74., 75., 70., 99.0, np.nan, 80., 60.],
    }, index=list("ABCDEFGHI"))
    front = pareto_front(df)
    # C: same cost as B, less accurate; D: as accurate as B, costlier; A and E are identical (a tie:
    # neither dominates); F and G have a NaN (never on it, F's 99% must not dominate anything).
    assert front.to_dict() == {"A": True, "B": True, "C": False, "D": False, "E": True, "F": False,
                               "G": False, "H": True, "I": True}
    assert front.dtype == bool and front.name == "pareto"


def test_pareto_front_throughput_is_higher_is_better():
    df = pd.DataFrame({"img_per_s": [100.0, 200.0, 150.0], "top1": [80.0, 80.0, 79.0]})
    assert pareto_front(df, x="img_per_s").tolist() == [False, True, False]
    # forced lower-is-better: (100, 80) is cheapest and best, it dominates both others
    assert pareto_front(df, x="img_per_s", lower_x_is_better=True).tolist() == [True, False, False]


def test_pareto_front_matches_definition_on_random_points():
    rng = random.Random(0)
    # few distinct values so that ties on x, on y and on both are frequent
    pts = [(rng.choice([1, 2, 3, 4, 5, np.nan]), rng.choice([60, 65, 70, 75, np.nan])) for _ in range(60)]
    df = pd.DataFrame(pts, columns=["mhsa_mflops", "top1"])

    def dominated(i):
        xi, yi = pts[i]
        return any(xj <= xi and yj >= yi and (xj < xi or yj > yi) for j, (xj, yj) in enumerate(pts) if j != i
                   and not (np.isnan(xj) or np.isnan(yj)))

    expected = [not (np.isnan(x) or np.isnan(y)) and not dominated(i) for i, (x, y) in enumerate(pts)]
    assert pareto_front(df).tolist() == expected
    assert any(expected) and not all(expected)


def test_pareto_front_unknown_column_lists_allowed():
    with pytest.raises(ValueError, match="mhsa_mflops.*img_per_s"):
        pareto_front(pd.DataFrame({"top1": [1.0]}), x="flops")


# ------------------------------------------------------------------ table

def test_pareto_table_columns_frontier_and_filtering(store_dir):
    table = pareto_table(rows_of(store_dir, profile="tiny"))
    assert list(table.columns) == ["method", "keep_rate", "mhsa_mflops", "mhsa_mflops_paper", "total_gflops",
                                   "top1", "img_per_s", "latency_ms", "peak_mib", "coef_sparsity_pct",
                                   "w_up_sparsity_pct", "mask_recall_pct", "pareto"]
    assert table["coef_sparsity_pct"].isna().all()  # no method here reports it
    assert "linformer" not in set(table["method"])  # failed rows are left out ...
    assert table.attrs["n_failed"] == 1  # ... and counted
    assert table.attrs["profile"] == "tiny" and table.attrs["dataset"] == "fashion_mnist"
    assert table["mhsa_mflops"].is_monotonic_increasing
    on = {(m, k) for m, k, p in zip(table["method"], table["keep_rate"], table["pareto"]) if p == "yes"}
    assert on == FRONT
    assert set(table["pareto"]) == {"yes", "no"}
    lat = dict(zip(table["method"] + table["keep_rate"].astype(str), table["latency_ms"]))
    assert lat["full1.0"] == pytest.approx(2.0 + 30 * 0.07398)  # latency_ms is the stored median


def test_pareto_table_keeps_latest_row_per_key_and_other_axes(store_dir):
    rows = rows_of(store_dir, profile="tiny")
    stale = rows[rows["method"] == "full"].copy()
    stale["created"] = "2000-01-01T00:00:00+00:00"
    stale["top1"] = 10.0
    table = pareto_table(pd.concat([rows, stale], ignore_index=True))
    assert (table["method"] == "full").sum() == 1
    assert table.loc[table["method"] == "full", "top1"].item() == 82.0
    # throughput: higher is better, sorted descending, the fastest config is on the frontier
    t = pareto_table(rows, x="img_per_s")
    assert t["img_per_s"].is_monotonic_decreasing and t["pareto"].iloc[0] == "yes"
    assert set(pareto_table(rows, x="latency_ms").query("pareto == 'yes'")["method"]) >= {"full", "evit"}


def test_pareto_table_errors(store_dir):
    rows = rows_of(store_dir)
    with pytest.raises(ValueError, match="several .profile, dataset. groups"):
        pareto_table(rows)
    with pytest.raises(ValueError, match="allowed: mhsa_mflops, mhsa_mflops_paper, total_gflops"):
        pareto_table(rows, x="params")
    with pytest.raises(ValueError, match="status 'ok'"):
        pareto_table(rows[rows["status"] == "failed"])
    bad = rows[rows["profile"] == "mini"].copy()
    bad["units"] = [{**u, "top1": "fraction"} for u in bad["units"]]
    with pytest.raises(ValueError, match="top1.*fraction"):
        pareto_table(bad)


# ------------------------------------------------------------------ files

def test_write_report_writes_md_csv_png_pdf(store_dir):
    paths = write_report(store_dir)
    names = sorted(p.name for p in paths)
    assert names == sorted([f"pareto_{p}_fashion_mnist{w}.{e}" for p in ("tiny", "mini") for w, e in
                            (("", "md"), ("", "csv"), ("", "tex"), ("", "png"), ("", "pdf"), ("_wide", "png"),
                             ("_wide", "pdf"))] + [f"isoflop_{p}_fashion_mnist.{e}" for p in ("tiny", "mini")
                                                   for e in ("md", "csv")])
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0 and p.parent == store_dir

    # the CSV round-trips the table's values at full precision
    csv = pd.read_csv(store_dir / "pareto_tiny_fashion_mnist.csv")
    table = pareto_table(rows_of(store_dir, profile="tiny"))
    pd.testing.assert_frame_equal(csv, table, check_exact=True, check_dtype=False)

    md = (store_dir / "pareto_tiny_fashion_mnist.md").read_text()
    header = md.splitlines()[0]
    for h in ("Method", "Keep rate", "MHSA (MFLOPs)", "MHSA, paper rule (MFLOPs)", "Top-1 (%)",
              "Throughput (img/s)", "Latency (ms/batch)", "Peak mem. (MiB)", "Pareto"):
        assert h in header
    caption = md.strip().splitlines()[-1]
    assert caption.startswith("Table:") and "`tiny`" in caption and "`fashion_mnist`" in caption
    assert "measured on this run" in caption and "1 failed" in caption
    assert "| sparsifiner |" in md and "0.07398" in md and "82.00" in md  # 4 significant digits, 2 for top-1

    png = (store_dir / "pareto_tiny_fashion_mnist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    img = mpimg.imread(store_dir / "pareto_tiny_fashion_mnist.png")
    assert img.shape[0] > 900 and img.shape[1] > 1000  # one column, 3.5 x 3.3 in at dpi 300
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert (store_dir / "pareto_tiny_fashion_mnist.pdf").read_bytes()[:5] == b"%PDF-"

    # filters and another x axis give their own stems
    only = write_report(store_dir, x="latency_ms", profile="mini")
    assert sorted(p.name for p in only) == sorted(f"pareto_mini_fashion_mnist_latency_ms{w}.{e}" for w, e in
                                                   (("", "md"), ("", "csv"), ("", "tex"), ("", "png"), ("", "pdf"),
                                                    ("_wide", "png"), ("_wide", "pdf")))


def test_write_report_errors(tmp_path, store_dir):
    with pytest.raises(ReportError, match="no results store"):  # a ValueError the CLI can print as one line
        write_report(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(ValueError, match="none with status 'ok'"):
        write_report(store_dir, dataset="imagenet")
    with pytest.raises(ValueError, match="allowed"):
        write_report(store_dir, x="accuracy")
    failed_only = tmp_path / "failed"
    with ResultsStore(failed_only / "results.sqlite") as store:
        store.put(make_row("evit", 0.5, 0.02, None, status="failed"))
    with pytest.raises(ValueError, match="none with status 'ok'"):
        write_report(failed_only)


def test_markdown_hides_paper_column_when_identical_and_empty_columns(tmp_path):
    table = pd.DataFrame({"method": ["full", "evit"], "keep_rate": [1.0, 0.7], "mhsa_mflops": [357.66, 193.09],
                          "mhsa_mflops_paper": [357.66, 193.09], "total_gflops": [np.nan, np.nan],
                          "top1": [79.8, 79.5], "pareto": ["yes", "yes"]})
    table.attrs = {"profile": "deit_s", "dataset": "imagenet", "x": "mhsa_mflops", "git": "abc", "n_failed": 0}
    md_path, csv_path, _ = write_table(table, tmp_path, "t")
    md = md_path.read_text()
    assert "paper rule" not in md.splitlines()[0] and "GFLOPs" not in md.splitlines()[0]
    assert "357.7" in md and "193.1" in md
    assert list(pd.read_csv(csv_path).columns) == list(table.columns)  # the CSV keeps every column


# ------------------------------------------------------------------ plot

def _curves(fig):
    """The method curves of a Pareto figure: (x data, y data, colour) of every line with markers."""
    ax = fig.axes[0]
    return [(np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float), to_rgba(ln.get_color()))
            for ln in ax.lines if ln.get_marker() not in (None, "None", "", " ", "_", "|")]  # caps aside


def _method_colours(fig, table):
    """Method -> colour of the curve through exactly that method's points (by increasing cost)."""
    out = {}
    for m in table["method"].unique():
        pts = table[table["method"] == m].sort_values("mhsa_mflops")
        hits = [c for x, y, c in _curves(fig) if len(x) == len(pts) and np.allclose(x, pts["mhsa_mflops"])
                and np.allclose(y, pts["top1"])]
        if hits:
            out[m] = hits[0]
    return out


def test_plot_one_curve_per_method_reference_lines_and_frontier(store_dir):
    table = pareto_table(rows_of(store_dir, profile="tiny"))
    fig = pareto_figure(table, title="t")
    ax = fig.axes[0]
    methods = table[table["method"] != "full"]  # the dense reference method is a reference line
    colours = _method_colours(fig, methods)
    assert set(colours) == set(methods["method"]) == {"evit", "sparsifiner", "dynamicvit"}  # one curve each
    assert len(set(colours.values())) == 3
    palette = method_palette(table["method"].unique())
    for m, c in colours.items():
        assert np.allclose(c[:3], to_rgba(palette[m])[:3], atol=1e-6)  # the method's declared colour
    full_top1 = float(table.loc[table["method"] == "full", "top1"].iloc[0])
    flat = [ln for ln in ax.lines if len(ln.get_ydata()) == 2 and np.allclose(ln.get_ydata(), full_top1)]
    assert flat, "the fine-tuned dense reference is a horizontal line"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["Sparsifiner", "EViT", "DynamicViT", f"Full attention (dense reference): {full_top1:.2f}%",
                      "Pareto frontier"]  # display names the methods declare, in their palette order

    # the frontier step line runs through exactly the frontier of the methods' points, by increasing cost
    steps = [ln for ln in ax.lines if ln.get_drawstyle().startswith("steps")]
    assert len(steps) == 1
    front = methods[pareto_front(methods, "mhsa_mflops")].sort_values("mhsa_mflops")
    assert np.allclose(steps[0].get_xdata(), front["mhsa_mflops"]) and np.allclose(steps[0].get_ydata(), front["top1"])
    # every method point is labelled with its keep rate; readable axes
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{k:g}" for k in methods["keep_rate"])
    assert ax.get_xlabel() == X_AXES["mhsa_mflops"].label and ax.get_ylabel() == "Top-1 accuracy (%)"


def test_layouts_single_column_legend_below_and_wide(store_dir):
    table = pareto_table(rows_of(store_dir, profile="tiny"))
    col, wide = pareto_figure(table, layout="column"), pareto_figure(table, layout="wide")
    assert tuple(col.get_size_inches()) == (3.5, 3.3) and tuple(wide.get_size_inches()) == (7.0, 3.3)
    r = col.canvas.get_renderer()
    legend, axes = col.legends[0].get_window_extent(r), col.axes[0].get_window_extent(r)
    assert legend.y1 <= axes.y0 + 1  # below the axes: the figure keeps one column's width
    with pytest.raises(ValueError, match="layout"):
        pareto_figure(table, layout="poster")


def test_several_seeds_give_mean_points_with_error_bars(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for seed, top1 in enumerate((70.0, 72.0, 74.0)):
            store.put(make_row("evit", 0.5, 0.02, top1, seed=seed))
            store.put(make_row("evit", 0.7, 0.04, top1 + 4, seed=seed))
        table = pareto_table(store.rows())
    fig = pareto_figure(table)
    [(x, y, _)] = _curves(fig)
    assert np.allclose(x, [0.02, 0.04]) and np.allclose(y, [72.0, 76.0])  # the means
    bars = [c for c in fig.axes[0].collections if type(c).__name__ == "LineCollection"]
    spans = sorted(abs(seg[1][1] - seg[0][1]) for c in bars for seg in c.get_segments())
    assert np.allclose(spans, [4.0, 4.0])  # +- one standard deviation (2.0) of the three seeds
    assert "EViT (n=3)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_palette_is_consistent_across_plots(store_dir, tmp_path):
    rows = rows_of(store_dir, profile="tiny")
    subset = pareto_table(rows[rows["method"].isin(["evit", "dynamicvit"])])
    full_tab = pareto_table(rows)
    c_sub, c_all = _method_colours(pareto_figure(subset), subset), _method_colours(pareto_figure(full_tab), full_tab)
    for m in ("evit", "dynamicvit"):
        assert np.allclose(c_sub[m], c_all[m])
    # an unknown method never reuses a built-in method's colour
    pal = method_palette(["evit", "my_method"])
    assert all(not np.allclose(pal["my_method"], pal[k]) for k in ("full", "sparsifiner", "evit", "dynamicvit",
                                                                      "linformer"))
    paths = plot_pareto(rows, "total_gflops", tmp_path / "plots", "p", "title")
    assert [p.name for p in paths] == ["p.png", "p.pdf", "p_wide.png", "p_wide.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="allowed"):
        plot_pareto(rows, "flops", tmp_path, "p", "t")


def test_declared_method_colours_are_distinguishable():
    # every pair of registered methods that declare a colour differs by a visible amount (RGB distance),
    # so two curves of one Pareto plot are never told apart by their markers alone
    from itertools import combinations

    from bench_suite.registry import list_methods

    pal = method_palette(list_methods())
    for a, b in combinations(sorted(pal), 2):
        assert np.linalg.norm(np.subtract(pal[a], pal[b])) > 0.12, (a, b, pal[a], pal[b])


def test_summary_text(store_dir):
    table = pareto_table(rows_of(store_dir, profile="tiny"))
    text = summary_text(table)
    lines = text.splitlines()
    assert "tiny / fashion_mnist" in lines[0] and "1 failed" in lines[0]
    assert len(lines) == 1 + 2 + len(table)  # title, header, rule, one line per configuration
    header = lines[1]
    start = header.index("Top-1 (%)")
    span = slice(start, start + len("Top-1 (%)"))
    for m, k, top1, p, line in zip(table["method"], table["keep_rate"], table["top1"], table["pareto"], lines[3:]):
        assert line.startswith(m) and f"{k:g}" in line and line.rstrip().endswith(p)
        assert line[span].strip() == f"{top1:.2f}"  # fixed-width: values sit under their header


def test_rows_with_non_default_settings_are_labelled_apart(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for p in POINTS:
            store.put(make_row(*p))
        variant = make_row("linformer", 0.25, 0.03, 71.0)
        variant["config"] = {**variant["config"], "overrides": {"proj_init": "pool", "share_kv": True}}
        variant["key"] = config_key(variant["config"])
        store.put(variant)
        store.put(make_row("linformer", 0.25, 0.03, 60.0))
        table = pareto_table(store.rows(profile="tiny"))
    labels = set(table["method"])
    assert {"linformer", "linformer (proj_init=pool, share_kv=True)"} <= labels
    assert table.loc[table["method"] == "linformer (proj_init=pool, share_kv=True)", "top1"].tolist() == [71.0]
    assert table.loc[table["method"] == "linformer", "top1"].tolist() == [60.0]


def test_sparsifiner_sparsity_is_shown_in_percent(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for p in POINTS:
            row = make_row(*p)
            if p[0] == "sparsifiner":
                row["metrics"] |= {"coef_sparsity": 0.87, "w_up_sparsity": 0.9034}
                row["units"] |= {"coef_sparsity": "fraction", "w_up_sparsity": "fraction"}
            store.put(row)
    paths = write_report(tmp_path)
    table = pareto_table(ResultsStore(tmp_path / "results.sqlite").rows())
    sp = table[table["method"] == "sparsifiner"]
    assert sp["coef_sparsity_pct"].tolist() == pytest.approx([87.0, 87.0])
    assert table.loc[table["method"] == "evit", "w_up_sparsity_pct"].isna().all()
    md = next(p for p in paths if p.suffix == ".md").read_text()
    assert "Coef. sparsity (%, paper 87)" in md and "W_up sparsity (%, paper 90)" in md
    assert re.search(r"\|\s+87\.0 \|\s+90\.3 \|", md)


def test_keep_rate_labels_of_nearby_points_do_not_overlap(tmp_path):
    # two methods whose points nearly coincide (the case where labels at one fixed offset collide)
    points = [("evit", 0.5, 3.334, 89.04), ("dynamicvit", 0.7, 3.40, 89.08), ("sparsifiner", 0.25, 3.37, 89.0),
              ("full", 1.0, 7.68, 90.2), ("evit", 0.3, 2.8, 88.6)]
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for p in points:
            store.put(make_row(*p))
        table = pareto_table(store.rows())
    fig = pareto_figure(table)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the labels' text (leader lines may cross)
    points = [p for p in points if p[0] != "full"]  # the dense reference is a line, not a labelled point
    assert len(boxes) == len(points)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())
    anchors = sorted((round(t.xy[0], 6), round(t.xy[1], 6)) for t in ax.texts)  # each label points at its point
    assert anchors == sorted((round(p[2], 6), round(p[3], 6)) for p in points)


# ------------------------------------------------------------------ seeds: statistics and noise
def test_seed_table_statistics_equal_numpy_on_stored_rows(tmp_path):
    tops = {"evit": [70.1, 72.4, 73.0], "sparsifiner": [75.0, 75.5, 74.2]}
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for m, values in tops.items():
            for seed, top1 in enumerate(values):
                store.put(make_row(m, 0.5, 0.02 if m == "evit" else 0.03, top1, seed=seed))
        rows = store.rows()
        table = pareto_table(rows)
    assert len(table) == 2 and "seed" not in table.columns
    assert list(table.columns[table.columns.get_loc("top1"):][:3]) == ["top1", "top1_sd", "n"]
    for m, values in tops.items():
        r = table[table.method == m].iloc[0]
        stored = rows[rows.method == m]["top1"].to_numpy(dtype=float)
        assert r["top1"] == pytest.approx(np.mean(stored)) and r["n"] == 3
        assert r["top1_sd"] == pytest.approx(np.std(stored, ddof=1))
        assert r["img_per_s"] == pytest.approx(np.mean(rows[rows.method == m]["img_per_s"].to_numpy(dtype=float)))


def test_welch_interval_closed_form():
    from bench_suite.pareto import t975, welch_interval

    lo, hi = welch_interval(75.0, 1.0, 3, 72.0, 1.0, 3)
    se = (1 / 3 + 1 / 3) ** 0.5  # equal variances and n: Welch's df = 2 (n - 1) = 4
    df = (2 / 3) ** 2 / (2 * (1 / 3) ** 2 / 2)
    assert df == pytest.approx(4.0)
    assert (lo, hi) == pytest.approx((3.0 - t975(4) * se, 3.0 + t975(4) * se))
    assert t975(4) == pytest.approx(2.776) and t975(1000) == pytest.approx(1.9624, abs=1e-3)
    assert all(np.isnan(welch_interval(1, 1, 1, 0, 1, 3)))


def test_frontier_on_means_marks_dominance_within_noise(tmp_path):
    # a: cheaper and better on the mean, by 0.3 points with s.d. ~1 -> b is dominated only within noise;
    # c: dominated by a by 10 points with tiny spread -> really dominated
    runs = {("evit", 0.5, 0.02): [75.0, 76.0, 74.6], ("evit", 0.7, 0.03): [75.9, 73.9, 75.0],
            ("sparsifiner", 0.5, 0.03): [65.0, 65.1, 65.2]}
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for (m, k, f), values in runs.items():
            for seed, top1 in enumerate(values):
                store.put(make_row(m, k, f, top1, seed=seed))
        table = pareto_table(store.rows())
    label = {(r.method, r.keep_rate): r.pareto for r in table.itertuples()}
    assert label == {("evit", 0.5): "yes", ("evit", 0.7): "noise", ("sparsifiner", 0.5): "no"}
    md = write_table(table, tmp_path, "t")[0].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "Top-1 s.d." in header and " n " in header and "Welch" in md


def test_one_seed_shows_no_standard_deviation(tmp_path):
    # evit has three seeds, full one: full's s.d. is unmeasured ("–"), not 0.00
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for seed, top1 in enumerate([75.0, 76.0, 74.6]):
            store.put(make_row("evit", 0.5, 0.02, top1, seed=seed))
        store.put(make_row("full", 1.0, 0.05, 77.0, seed=0))
        table = pareto_table(store.rows())
    from bench_suite.pareto import format_table

    shown = format_table(table).set_index(table["method"].to_numpy())
    assert shown.loc["full", "top1_sd"] == "–" and shown.loc["full", "n"] == "1"
    assert shown.loc["evit", "top1_sd"] == f"{np.std([75.0, 76.0, 74.6], ddof=1):.2f}"


def test_speed_columns_say_whether_one_timing_pass_measured_them(tmp_path):
    """Rows that share one interleaved timing pass (bench_suite.speed_pass) compare; rows timed each after its own
    training are labelled not comparable."""
    for shared in (True, False):
        with ResultsStore(tmp_path / f"{shared}.sqlite") as store:
            for i, p in enumerate(POINTS):
                row = make_row(*p)
                row["metrics"]["speed_pass"] = 20261202120000 if shared or i else 20261202110000
                row["units"]["speed_pass"] = "UTC time (YYYYMMDDhhmmss)"
                store.put(row)
            table = pareto_table(store.rows(), x="mhsa_mflops")
        out = write_table(table, tmp_path, f"t{shared}")
        caption = out[0].read_text(encoding="utf-8")
        assert ("one interleaved timing pass over all 6 rows" in caption) is shared
        assert ("NOT COMPARABLE" in caption) is not shared
