"""The paper's numbers: the data file, validated, and the suite configuration of each of its rows."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from bench_suite.errors import DataFileError, UserError

__all__ = ["DATA_FILE", "TABLES", "TABLE_TITLES", "NUM_CLASSES_PAPER", "PAPER_NUMBERS", "SuiteConfig", "load_paper_results", "check_tables", "run_plan"]

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "paper_results.csv"
TABLES = (1, 2, 3, 4)
TABLE_TITLES = {
    1: "Comparison with token pruning methods on DeiT-S and LV-ViT-S (224x224)",
    2: "Effect of the attention budget on MHSA FLOPs and top-1 (Sparsifiner-S, DeiT-S, 224x224)",
    3: "High-resolution images: Sparsifiner on DeiT-T at 384x384",
    4: "Sparse full-rank attention (Sparsifiner-S) against low-rank attention (Linformer), DeiT-S",
}
NUM_CLASSES_PAPER = 1000  # ImageNet: the paper-scale models are counted with their real classifier
PAPER_NUMBERS = ("paper_token_keep_rate", "paper_attn_keep_rate", "paper_att_num", "paper_mhsa_mflops",
                  "paper_overall_gflops", "paper_top1")
_REQUIRED = ("table", "row", "model", "backbone", *PAPER_NUMBERS, "suite_method", "suite_keep_rate",
             "suite_overrides", "suite_role", "mhsa_reproducible", "overall_reproducible", "note")
_ROLES = ("same", "flops_proxy")



# --------------------------------------------------------------------------- the data file
@dataclass(frozen=True)
class SuiteConfig:
    """One suite configuration: a registered method, its keep rate and hyperparameter overrides (the
    overrides are a sorted tuple of ``(name, value)`` so that the config is hashable)."""

    method: str
    keep_rate: float
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def label(self) -> str:
        """``"sparsif_evit keep 0.25, token_keep_rate=0.7"``."""
        extra = "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}" for k, v in self.overrides)
        return f"{self.method} keep {self.keep_rate:g}{extra}"

    def plan_entry(self) -> tuple[str, float, dict[str, Any]]:
        return self.method, self.keep_rate, self.overrides_dict


def _number(text: str, what: str) -> tuple[float | None, int | None]:
    """``"357.7"`` -> ``(357.7, 1)`` (value, printed decimals); ``""`` -> ``(None, None)``."""
    text = text.strip()
    if not text:
        return None, None
    try:
        value = float(text)
    except ValueError:
        raise DataFileError(f"{what}: {text!r} is not a number") from None
    return value, (len(text.split(".", 1)[1]) if "." in text else 0)


def load_paper_results(path: str | Path = DATA_FILE) -> pd.DataFrame:
    """Read and validate the paper-results data file.

    Returns:
        One row per (table, row) in file order: the file's columns with the ``paper_*`` numbers as floats
        (NaN where the paper prints nothing), ``paper_<x>_decimals`` (the printed decimals of each
        number), ``table``/``row`` as ints, ``suite_keep_rate`` float, ``suite_overrides`` as a dict,
        ``mhsa_reproducible``/``overall_reproducible`` as True/False/None, and ``config``
        (:class:`SuiteConfig`).

    Raises:
        DataFileError: for a missing file or column, a malformed value, a duplicate (table, row), an
            unknown method or profile, or an override the method does not take.
    """
    from bench_suite.backbones import PROFILES
    from bench_suite.registry import UnknownMethodError, get_method

    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"paper-results data file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataFileError(f"{path}: not a readable CSV file: {e}") from None
    if not lines:
        raise DataFileError(f"{path} is empty")
    header = lines[0]
    for n, fields in enumerate(lines[1:], start=2):
        if fields and len(fields) != len(header):
            raise DataFileError(f"{path.name} line {n}: {len(fields)} fields, the header has {len(header)}")
    raw = pd.DataFrame([f for f in lines[1:] if f], columns=header, dtype=str)
    missing = [c for c in _REQUIRED if c not in raw.columns]
    if missing:
        raise DataFileError(f"{path}: missing column(s) {', '.join(missing)}")
    records = []
    for i, r in raw.iterrows():
        where = f"{path.name} line {i + 2}"
        rec: dict[str, Any] = {c: r[c] for c in raw.columns}
        try:
            rec["table"], rec["row"] = int(r["table"]), int(r["row"])
        except ValueError:
            raise DataFileError(f"{where}: table and row must be integers") from None
        if rec["table"] not in TABLES:
            raise DataFileError(f"{where}: table {rec['table']} is not one of {TABLES}")
        for col in PAPER_NUMBERS:
            rec[col], rec[f"{col}_decimals"] = _number(r[col], f"{where}, {col}")
        if r["backbone"] not in PROFILES:
            raise DataFileError(f"{where}: backbone {r['backbone']!r} is not a profile ({', '.join(PROFILES)})")
        try:
            spec = get_method(r["suite_method"])
        except UnknownMethodError as e:
            raise DataFileError(f"{where}: {e}") from None
        rate, _ = _number(r["suite_keep_rate"], f"{where}, suite_keep_rate")
        if rate is None or not 0.0 < rate <= 1.0:
            raise DataFileError(f"{where}: suite_keep_rate must lie in (0, 1], got {r['suite_keep_rate']!r}")
        try:
            overrides = json.loads(r["suite_overrides"] or "{}")
        except json.JSONDecodeError as e:
            raise DataFileError(f"{where}: suite_overrides is not JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise DataFileError(f"{where}: suite_overrides must be a JSON object, got {r['suite_overrides']!r}")
        unknown = sorted(set(overrides) - (set(spec.defaults()) - {"keep_rate"}))
        if unknown:
            raise DataFileError(f"{where}: {', '.join(unknown)} is not a setting of {spec.name}")
        if r["suite_role"] not in _ROLES:
            raise DataFileError(f"{where}: suite_role must be one of {_ROLES}, got {r['suite_role']!r}")
        for col in ("mhsa_reproducible", "overall_reproducible"):
            value = r[col].strip().lower()
            if value not in ("yes", "no", ""):
                raise DataFileError(f"{where}: {col} must be yes, no or empty, got {r[col]!r}")
            rec[col] = None if value == "" else value == "yes"
        if rec["mhsa_reproducible"] is None:
            raise DataFileError(f"{where}: mhsa_reproducible must be yes or no")
        rec["suite_keep_rate"] = rate
        rec["suite_overrides"] = overrides
        rec["config"] = SuiteConfig(spec.name, rate, tuple(sorted(overrides.items())))
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    dup = df.duplicated(["table", "row"])
    if dup.any():
        t, n = df.loc[dup.idxmax(), ["table", "row"]]
        raise DataFileError(f"{path}: table {t} row {n} appears twice")
    return df


def check_tables(tables: int | Iterable[int] | None) -> tuple[int, ...]:
    if tables is None:
        return TABLES
    out = (int(tables),) if isinstance(tables, (int, float, str)) else tuple(int(t) for t in tables)
    bad = [t for t in out if t not in TABLES]
    if bad or not out:
        raise UserError(f"--table must be one of {', '.join(map(str, TABLES))}, got {', '.join(map(str, bad))}")
    return out


def run_plan(table: int | Iterable[int], path: str | Path = DATA_FILE) -> list[tuple[str, float, dict[str, Any]]]:
    """The configurations that ``python -m bench_suite run --table N`` trains: every distinct
    ``(method, keep rate, overrides)`` of table ``N``'s rows whose suite method is the paper's method
    (``suite_role == "same"``; FLOP-only proxies are left out), in row order. The profile is the run's
    ``--profile``, so that the table shows top-1 measured on the profile that was run.

    Raises:
        UserError: for a table that is not 1-4.
        DataFileError: for a malformed data file.
    """
    tables = check_tables(table)
    df = load_paper_results(path)
    rows = df[df["table"].isin(tables) & (df["suite_role"] == "same")]
    return [c.plan_entry() for c in dict.fromkeys(rows["config"])]
