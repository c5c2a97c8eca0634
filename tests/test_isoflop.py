"""The iso-FLOP table (bench_suite/isoflop.py): interpolation inside the measured range only, its standard
error, the best method per budget."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench_suite.isoflop import interpolate_at, iso_flop_table, write_iso_flop_table


def test_interpolation_closed_form_and_never_outside_the_measured_range():
    xs, ys, ses = [2.0, 6.0, 4.0], [80.0, 90.0, 86.0], [0.1, 0.3, 0.2]
    y, se = interpolate_at(xs, ys, ses, 3.0)  # halfway between (2, 80) and (4, 86)
    assert y == pytest.approx(83.0) and se == pytest.approx(math.sqrt(0.05 ** 2 + 0.1 ** 2))
    assert interpolate_at(xs, ys, ses, 4.0) == pytest.approx((86.0, 0.2))  # a measured point as it is
    assert interpolate_at(xs, ys, ses, 6.0) == pytest.approx((90.0, 0.3))  # the range's end is inside
    for outside in (1.999, 6.001, 100.0):
        assert all(math.isnan(v) for v in interpolate_at(xs, ys, ses, outside))
    assert all(math.isnan(v) for v in interpolate_at([], [], [], 1.0))


def test_iso_flop_table_reads_each_method_on_its_own_curve_and_names_the_best():
    table = pd.DataFrame({
        "method": ["teacher", "full", "a", "a", "a", "b", "b"],
        "keep_rate": [1.0, 1.0, 0.5, 0.25, 0.1, 0.7, 0.5],
        "mhsa_mflops": [8.0, 8.0, 6.0, 4.0, 2.0, 5.0, 3.0],
        "top1": [90.0, 89.5, 89.0, 88.0, 86.0, 88.6, 87.0],
        "top1_sd": [0.0, 0.0, 0.1, 0.1, 0.1, 0.5, 0.5],
        "n": [1, 3, 3, 3, 3, 3, 3],
    })
    iso = iso_flop_table(table, budgets=(0.25, 0.5, 0.75))  # 2, 4 and 6 MFLOPs
    a = iso[iso.method == "a"].iloc[0]
    b = iso[iso.method == "b"].iloc[0]
    assert (a["top1@0.25"], a["top1@0.5"], a["top1@0.75"]) == (86.0, 88.0, 89.0)
    assert math.isnan(b["top1@0.25"]) and math.isnan(b["top1@0.75"])  # outside b's range [3, 5]
    assert b["top1@0.5"] == pytest.approx(87.8)  # halfway between (3, 87.0) and (5, 88.6)
    assert b["se@0.5"] == pytest.approx(math.sqrt(2 * (0.5 * 0.5 / math.sqrt(3)) ** 2))
    best = iso[iso.method == "best"].iloc[0]
    assert best["top1@0.25"] == "a" and best["top1@0.75"] == "a"
    assert best["top1@0.5"] == "a (within noise of b)"  # 0.2 points apart, se of the difference ~0.21
    assert set(iso.method) == {"a", "b", "best"}  # no teacher or dense reference row


def test_written_table_says_what_was_interpolated(tmp_path):
    table = pd.DataFrame({"method": ["teacher", "a", "a"], "keep_rate": [1.0, 0.5, 0.25],
                          "mhsa_mflops": [8.0, 6.0, 2.0], "top1": [90.0, 89.0, 87.0]})
    md, csv = write_iso_flop_table(table, tmp_path, "iso")
    text = md.read_text()
    assert "88.00" in text and "never" in text and "±" not in text.split("Table:")[0]  # one seed: no ± shown
    assert pd.read_csv(csv)["top1@0.5"].iloc[0] == pytest.approx(88.0)
    empty = pd.DataFrame({"method": ["teacher", "a"], "keep_rate": [1.0, 0.5], "mhsa_mflops": [8.0, 7.9],
                          "top1": [90.0, 89.0]})
    assert write_iso_flop_table(empty, tmp_path, "none") == []  # no budget inside any measured range
