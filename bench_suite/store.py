"""The results store: one embedded SQLite database per results folder, ``<output>/results.sqlite``.

One row per benchmark configuration, keyed by :func:`config_key` of the resolved config (method,
keep rate, profile, dataset, seed, hyperparameters, ...). A row is written in one transaction, so it
is complete or absent, never partial; re-running a configuration replaces its row (upsert). The
database runs in WAL mode with a busy timeout, so several processes (e.g. two runners sharing a
folder) can write at the same time.

Row layout (the dict given to :meth:`ResultsStore.put`)::

    {"key": str, "status": "ok" | "failed", "method": str, "keep_rate": float, "profile": str,
     "dataset": str, "seed": int, "config": {...resolved config...},
     "metrics": {name: number | None}, "units": {name: unit string}, "versions": {...},
     "git": str, "error": str | None}

The store adds ``created`` (UTC, ISO 8601). Typical metric names and units: ``top1`` / ``val_top1``
(%), ``mhsa_mflops`` (MFLOPs, measured), ``mhsa_mflops_paper`` (MFLOPs, the paper's counting rule,
may be None), ``mhsa_proj_mflops`` (MFLOPs), ``total_gflops`` (GFLOPs), ``img_per_s`` (img/s),
``latency_ms_median`` / ``latency_ms_p90`` (ms), ``peak_mib`` (MiB), ``train_seconds`` (s).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping

import pandas as pd

from bench_suite.errors import ReportError, StoreCorruptError

__all__ = [
    "SCHEMA_VERSION",
    "STORE_FILENAME",
    "REQUIRED_KEYS",
    "ROW_COLUMNS",
    "StoreCorruptError",
    "ResultsStore",
    "config_key",
    "canonical_json",
]

SCHEMA_VERSION = 1
STORE_FILENAME = "results.sqlite"
STATUSES = ("ok", "failed")
REQUIRED_KEYS = ("key", "status", "method", "keep_rate", "profile", "dataset", "seed", "config", "metrics",
                 "units", "versions", "git", "error")
# Scalar columns of the flattened frame, in order; metric columns follow, then config/versions/units.
ROW_COLUMNS = ("key", "status", "method", "keep_rate", "profile", "dataset", "seed", "created", "git", "error")
DICT_COLUMNS = ("config", "versions", "units")
FILTERABLE = ("key", "status", "method", "keep_rate", "profile", "dataset", "seed", "git")
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    key       TEXT PRIMARY KEY,
    status    TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    method    TEXT NOT NULL,
    keep_rate REAL NOT NULL,
    profile   TEXT NOT NULL,
    dataset   TEXT NOT NULL,
    seed      INTEGER NOT NULL,
    created   TEXT NOT NULL,
    git       TEXT NOT NULL,
    error     TEXT,
    config    TEXT NOT NULL,
    metrics   TEXT NOT NULL,
    units     TEXT NOT NULL,
    versions  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_group ON results (profile, dataset, method, keep_rate);
"""


# --------------------------------------------------------------------------- keys

def _jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback: paths as strings, numpy scalars/arrays as Python values, sets sorted."""
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalar or array, torch tensor
        return obj.tolist()
    raise TypeError(f"value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 text; tuples become lists; NaN/inf rejected.

    Raises:
        TypeError: for a value that has no JSON form.
        ValueError: for NaN or infinite floats (they have no canonical JSON form).
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_jsonable)


def config_key(config: Mapping[str, Any]) -> str:
    """The configuration key: first 16 hex digits of the sha256 of :func:`canonical_json` of ``config``.

    Two configs that differ only in dict order (or tuple vs list) get the same key.
    """
    return hashlib.sha256(canonical_json(dict(config)).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- validation

def _clean_metric(name: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "item"):
        raise ValueError(f"metric {name!r} must be a number or None, got {value!r}")
    if hasattr(value, "item") and not isinstance(value, (int, float)):  # numpy / torch scalar
        value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"metric {name!r} must be a number or None, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / inf are stored as missing (JSON has no NaN)
    return value


def _validate(row: Mapping[str, Any]) -> dict[str, Any]:
    """Check a row given to :meth:`ResultsStore.put`; return a normalised copy.

    Raises:
        ValueError: naming the missing keys, or the first malformed field.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"a result row must be a dict, got {type(row).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"result row is missing required key(s): {', '.join(missing)}")
    out = dict(row)
    for k in ("key", "method", "profile", "dataset", "git"):
        if not isinstance(out[k], str) or not out[k]:
            raise ValueError(f"result row field {k!r} must be a non-empty string, got {out[k]!r}")
    if out["status"] not in STATUSES:
        raise ValueError(f"result row status must be one of {STATUSES}, got {out['status']!r}")
    try:
        out["keep_rate"] = float(out["keep_rate"])
        seed = out["seed"]
        if isinstance(seed, bool) or int(seed) != seed:
            raise TypeError
        out["seed"] = int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"result row needs a numeric keep_rate and an integer seed, got "
                         f"{row['keep_rate']!r} and {row['seed']!r}") from None
    if not 0.0 < out["keep_rate"] <= 1.0:
        raise ValueError(f"keep_rate must lie in (0, 1], got {out['keep_rate']}")
    if out["error"] is not None and not isinstance(out["error"], str):
        raise ValueError(f"result row field 'error' must be a string or None, got {out['error']!r}")
    for k in ("config", "metrics", "units", "versions"):
        if not isinstance(out[k], Mapping):
            raise ValueError(f"result row field {k!r} must be a dict, got {type(out[k]).__name__}")
    clash = sorted(set(out["metrics"]) & (set(ROW_COLUMNS) | set(DICT_COLUMNS)))
    if clash:
        raise ValueError(f"metric names {clash} clash with the store's own columns")
    out["metrics"] = {str(n): _clean_metric(str(n), v) for n, v in out["metrics"].items()}
    out["units"] = {str(n): str(u) for n, u in out["units"].items()}
    return out


# --------------------------------------------------------------------------- store

class ResultsStore:
    """The SQLite results store of one results folder.

    Args:
        path: the database file (usually ``<output>/results.sqlite``) or the results folder itself
            (then :data:`STORE_FILENAME` inside it is used). Missing parent folders are created.
        create: make a new store where there is none (the runner); ``False`` for readers (``report``,
            ``tables``, ``visualize``), which then never write a schema into a missing or empty file.

    Raises:
        StoreCorruptError: if the file exists but is not a SQLite database, is damaged, or is a SQLite
            database of something else (a zero-byte file too, for a reader). The file is never modified in
            that case.
        ReportError: for a reader (``create=False``) when there is no store at ``path``.

    Use it as a context manager or call :meth:`close`. One instance per process (the connection is not
    shared across ``fork``); any number of processes may open the same file at once.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True):
        p = Path(path)
        if p.is_dir():
            p = p / STORE_FILENAME
        self.path = p
        self._conn: sqlite3.Connection | None = None
        if not create:
            if not p.exists():
                raise ReportError(f"no results store at {p}; run 'python -m bench_suite run --output {p.parent}' first")
            if p.is_file() and p.stat().st_size == 0:
                raise self._corrupt("an empty file")
        self._check_header()
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(p), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._init_schema()
        except sqlite3.DatabaseError as e:
            self.close()
            raise self._corrupt(f"{e}") from None

    # ----------------------------------------------------------- opening
    def _corrupt(self, why: str) -> StoreCorruptError:
        return StoreCorruptError(f"results store {self.path} is not a readable bench_suite results database "
                                 f"({why}); it was left untouched - move it away or pass another --output")

    def _check_header(self) -> None:
        """Refuse a non-empty file without the SQLite header before SQLite ever opens it for writing.

        The header is read through SQLite itself (a read-only connection), never with a plain ``open()``:
        closing *any* descriptor of a file drops every POSIX record lock this process holds on it (``fcntl``
        semantics), an open connection's included. Another process then believes it is the database's last
        user, checkpoints and deletes the WAL under this one, and later commits here are lost or leave a
        malformed database. SQLite shares one lock table per file within a process, so its own connections
        never do that to each other.
        """
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise self._corrupt("not a regular file")
        if self.path.stat().st_size == 0:
            return  # an empty file is an empty database to SQLite (a reader refuses it before this)
        uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
        probe = None
        try:
            probe = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            probe.execute("PRAGMA schema_version").fetchone()  # reads page 1; SQLITE_NOTADB without the header
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e):
                raise self._corrupt("no SQLite header") from None
            raise self._corrupt(f"{e}") from None
        finally:
            if probe is not None:
                probe.close()

    def _init_schema(self) -> None:
        conn = self._conn
        assert conn is not None
        # Read-only checks first, so a foreign or damaged database is never written to.
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "schema_version" not in tables:
            raise self._corrupt(f"a SQLite database without bench_suite tables: {sorted(tables)}")
        if tables:
            self._check_version()
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise self._corrupt("damaged: " + "; ".join(map(str, problems[:3])))
        for attempt in range(50):  # switching to WAL needs a short exclusive lock; retry if another
            try:                   # process holds one that the busy handler does not wait for
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.05 + 0.01 * attempt)
        if str(mode).lower() != "wal":  # e.g. a file system without shared memory; still correct
            conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = NORMAL")
        if tables:
            return
        with self._transaction():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(stmt)
            if conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        self._check_version()

    def _check_version(self) -> None:
        assert self._conn is not None
        rows = self._conn.execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1:
            raise self._corrupt(f"schema_version holds {len(rows)} rows")
        if rows[0][0] > SCHEMA_VERSION:
            raise self._corrupt(f"schema version {rows[0][0]} is newer than this bench_suite's "
                                f"{SCHEMA_VERSION}; upgrade bench_suite")

    # ----------------------------------------------------------- transactions
    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now (waits up to busy_timeout)
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self) -> "ResultsStore._Tx":
        return ResultsStore._Tx(self.conn)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"results store {self.path} is closed")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    # ----------------------------------------------------------- API
    def has(self, key: str, status: str | None = "ok") -> bool:
        """Whether a row with ``key`` exists (with that ``status``; ``status=None``: any status)."""
        if status is None:
            cur = self.conn.execute("SELECT 1 FROM results WHERE key = ?", (key,))
        else:
            cur = self.conn.execute("SELECT 1 FROM results WHERE key = ? AND status = ?", (key, status))
        return cur.fetchone() is not None

    def get(self, key: str) -> dict[str, Any] | None:
        """The row stored under ``key`` (the dict given to :meth:`put` plus ``created``), or None."""
        cur = self.conn.execute(f"SELECT {', '.join(_ALL_SQL_COLUMNS)} FROM results WHERE key = ?", (key,))
        rec = cur.fetchone()
        return None if rec is None else _decode(rec)

    def put(self, row: Mapping[str, Any]) -> None:
        """Insert or replace (upsert) one row, atomically, stamping ``created`` with the UTC time.

        Raises:
            ValueError: if required keys are missing (all of them are named) or a field is malformed.
            TypeError: if ``config``/``versions`` hold values with no JSON form.
        """
        r = _validate(row)
        created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        values = (r["key"], r["status"], r["method"], r["keep_rate"], r["profile"], r["dataset"], r["seed"],
                  created, r["git"], r["error"], canonical_json(r["config"]), canonical_json(r["metrics"]),
                  canonical_json(r["units"]), canonical_json(r["versions"]))
        cols = ", ".join(_ALL_SQL_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _ALL_SQL_COLUMNS if c != "key")
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO results ({cols}) VALUES ({', '.join('?' * len(values))}) "
                         f"ON CONFLICT(key) DO UPDATE SET {updates}", values)

    def update_metrics(self, key: str, metrics: Mapping[str, Any], units: Mapping[str, str] | None = None) -> bool:
        """Merge ``metrics`` (and their ``units``) into the row under ``key``, atomically, keeping everything
        else (``created`` included); returns whether there was such a row.

        Raises:
            TypeError: if a value has no JSON form.
        """
        with self._transaction() as conn:
            rec = conn.execute("SELECT metrics, units FROM results WHERE key = ?", (key,)).fetchone()
            if rec is None:
                return False
            merged = {**json.loads(rec[0] or "{}"), **dict(metrics)}
            merged_units = {**json.loads(rec[1] or "{}"), **dict(units or {})}
            conn.execute("UPDATE results SET metrics = ?, units = ? WHERE key = ?",
                         (canonical_json(merged), canonical_json(merged_units), key))
        return True

    def delete(self, key: str) -> bool:
        """Delete the row under ``key``; returns whether there was one."""
        with self._transaction() as conn:
            return conn.execute("DELETE FROM results WHERE key = ?", (key,)).rowcount > 0

    def rows(self, **filters: Any) -> pd.DataFrame:
        """All rows as a flat DataFrame, oldest first.

        Columns: ``key, status, method, keep_rate, profile, dataset, seed, created, git, error``, then
        one float column per metric name found in the selected rows (missing values NaN), then
        ``config``, ``versions``, ``units`` holding dicts.

        Args:
            **filters: column equals value, for any of ``key, status, method, keep_rate, profile,
                dataset, seed, git``; a list/tuple/set value means "any of these"; None means no filter.

        Raises:
            ValueError: for an unknown filter name.
        """
        unknown = sorted(set(filters) - set(FILTERABLE))
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; allowed: {', '.join(FILTERABLE)}")
        where, params = [], []
        for name, value in filters.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple, set, frozenset)):
                values = list(value)
                if not values:
                    where.append("0")
                    continue
                where.append(f"{name} IN ({', '.join('?' * len(values))})")
                params.extend(values)
            else:
                where.append(f"{name} = ?")
                params.append(value)
        sql = f"SELECT {', '.join(_ALL_SQL_COLUMNS)} FROM results"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created, key"
        try:
            decoded = [_decode(rec) for rec in self.conn.execute(sql, params).fetchall()]
        except (json.JSONDecodeError, TypeError) as e:
            raise self._corrupt(f"a stored row holds malformed JSON: {e}") from None
        return _flatten(decoded)


_ALL_SQL_COLUMNS = ("key", "status", "method", "keep_rate", "profile", "dataset", "seed", "created", "git",
                    "error", "config", "metrics", "units", "versions")


def _decode(rec: Iterable[Any]) -> dict[str, Any]:
    d = dict(zip(_ALL_SQL_COLUMNS, rec))
    for k in ("config", "metrics", "units", "versions"):
        d[k] = json.loads(d[k])
    return d


def _flatten(decoded: list[dict[str, Any]]) -> pd.DataFrame:
    metric_names: list[str] = list(dict.fromkeys(n for d in decoded for n in d["metrics"]))
    records = []
    for d in decoded:
        rec = {c: d[c] for c in ROW_COLUMNS}
        rec.update({n: d["metrics"].get(n) for n in metric_names})
        rec.update({c: d[c] for c in DICT_COLUMNS})
        records.append(rec)
    columns = [*ROW_COLUMNS, *metric_names, *DICT_COLUMNS]
    df = pd.DataFrame.from_records(records, columns=columns)
    for n in metric_names:
        df[n] = pd.to_numeric(df[n], errors="coerce").astype(float)
    if len(df):
        df["keep_rate"] = df["keep_rate"].astype(float)
        df["seed"] = df["seed"].astype(int)
    return df
