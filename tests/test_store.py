"""Tests of the SQLite results store (bench_suite.store)."""
from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import sqlite3
from datetime import datetime

import pytest

from bench_suite.store import (REQUIRED_KEYS, ResultsStore, StoreCorruptError, canonical_json, config_key)


def make_row(method="evit", keep_rate=0.7, seed=0, status="ok", top1=71.5, **extra):
    config = {"method": method, "keep_rate": keep_rate, "profile": "tiny", "dataset": "fashion_mnist",
              "seed": seed, "epochs": 1, "lr": 5e-4, **extra}
    return {
        "key": config_key(config), "status": status, "method": method, "keep_rate": keep_rate,
        "profile": "tiny", "dataset": "fashion_mnist", "seed": seed, "config": config,
        "metrics": {"top1": top1, "mhsa_mflops": 0.074 * keep_rate, "mhsa_mflops_paper": None,
                    "img_per_s": 1234.5},
        "units": {"top1": "%", "mhsa_mflops": "MFLOPs", "mhsa_mflops_paper": "MFLOPs", "img_per_s": "img/s"},
        "versions": {"torch": "2.14.1", "timm": "1.0.31"}, "git": "abc123def456",
        "error": None if status == "ok" else "RuntimeError: boom",
    }


def test_config_key_is_sha256_prefix_of_canonical_json_and_order_independent():
    a = {"method": "evit", "keep_rate": 0.7, "hp": {"lr": 1e-3, "wd": 0.05}, "stages": (3, 6, 9)}
    b = {"stages": [3, 6, 9], "hp": {"wd": 0.05, "lr": 1e-3}, "keep_rate": 0.7, "method": "evit"}
    assert config_key(a) == config_key(b)
    assert config_key(a) == hashlib.sha256(canonical_json(a).encode()).hexdigest()[:16]
    assert len(config_key(a)) == 16 and int(config_key(a), 16) >= 0
    assert config_key({**a, "keep_rate": 0.5}) != config_key(a)
    with pytest.raises(ValueError):
        config_key({"x": float("nan")})


def test_round_trip_of_a_row(tmp_path):
    row = make_row()
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.put(row)
        got = store.get(row["key"])
        assert store.get("0" * 16) is None
    for k in REQUIRED_KEYS:
        assert got[k] == row[k], k
    created = datetime.fromisoformat(got["created"])
    assert created.utcoffset().total_seconds() == 0
    # a second process/instance sees the same row; the flat frame has one column per metric
    with ResultsStore(tmp_path) as store:  # the folder is accepted too
        df = store.rows()
    assert list(df.columns[:10]) == ["key", "status", "method", "keep_rate", "profile", "dataset", "seed",
                                     "created", "git", "error"]
    assert list(df.columns[-3:]) == ["config", "versions", "units"]
    assert len(df) == 1
    r = df.iloc[0]
    assert r["top1"] == 71.5 and r["mhsa_mflops"] == pytest.approx(0.074 * 0.7)
    assert math.isnan(r["mhsa_mflops_paper"])
    assert r["config"] == row["config"] and r["units"]["top1"] == "%" and r["versions"]["timm"] == "1.0.31"


def test_has_respects_status(tmp_path):
    ok, failed = make_row(seed=0), make_row(seed=1, status="failed", top1=None)
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert not store.has(ok["key"])
        store.put(ok)
        store.put(failed)
        assert store.has(ok["key"])
        assert not store.has(failed["key"])  # default: only finished ("ok") rows count as done
        assert store.has(failed["key"], status="failed")
        assert store.has(failed["key"], status=None)
        assert store.delete(failed["key"]) and not store.has(failed["key"], status=None)
        assert not store.delete(failed["key"])


def test_upsert_replaces_the_row(tmp_path):
    first = make_row(status="failed", top1=None)
    second = make_row(status="ok", top1=80.25)
    assert first["key"] == second["key"]
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.put(first)
        created1 = store.get(first["key"])["created"]
        store.put(second)
        got = store.get(first["key"])
        assert len(store) == 1
        assert got["status"] == "ok" and got["metrics"]["top1"] == 80.25 and got["error"] is None
        assert got["created"] >= created1


def test_filters(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        for m, kr in [("evit", 0.7), ("evit", 0.5), ("full", 1.0)]:
            store.put(make_row(method=m, keep_rate=kr))
        assert set(store.rows(method="evit")["keep_rate"]) == {0.7, 0.5}
        assert len(store.rows(method=["evit", "full"], keep_rate=0.5)) == 1
        assert len(store.rows(profile=None)) == 3  # None = no filter
        assert store.rows(method="dynamicvit").empty
        assert "key" in store.rows(method="dynamicvit").columns
        with pytest.raises(ValueError, match="allowed"):
            store.rows(colour="red")


def test_missing_keys_are_rejected_and_named(tmp_path):
    row = make_row()
    del row["metrics"], row["git"]
    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(ValueError) as e:
            store.put(row)
        assert "metrics" in str(e.value) and "git" in str(e.value)
        with pytest.raises(ValueError, match="status"):
            store.put({**make_row(), "status": "done"})
        with pytest.raises(ValueError, match="top1"):
            store.put({**make_row(), "metrics": {"top1": "high"}})
        assert len(store) == 0


def _writer(path: str, worker: int, n: int) -> None:
    store = ResultsStore(path)
    for i in range(n):
        store.put(make_row(method=f"m{worker}", seed=i, top1=float(i)))
    store.close()


def test_two_processes_write_concurrently(tmp_path):
    path = str(tmp_path / "results.sqlite")
    ctx = mp.get_context("spawn")  # fresh interpreters, as two runner processes would be
    procs = [ctx.Process(target=_writer, args=(path, w, 50)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    with ResultsStore(path) as store:
        df = store.rows()
        assert len(df) == 100 and df["key"].is_unique
        assert sorted(df.groupby("method").size().tolist()) == [50, 50]
        assert sorted(df[df.method == "m1"]["top1"]) == [float(i) for i in range(50)]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def _open_and_close(path):
    ResultsStore(path).close()


def test_a_second_instance_keeps_the_first_ones_locks(tmp_path):
    # The runner keeps its store open for the sweep and opens another instance for the speed pass. Opening
    # one must not drop the first one's POSIX locks (a plain open()/close() of the file does): another
    # process closing its connection would then take itself for the last user, checkpoint and delete the
    # WAL under the first instance, whose next commit is lost (two concurrent sweeps read back malformed).
    path = tmp_path / "results.sqlite"
    first = ResultsStore(path)
    first.put(make_row(seed=0))
    ResultsStore(path).close()  # a second instance in this process
    other = mp.get_context("spawn").Process(target=_open_and_close, args=(str(path),))
    other.start()
    other.join(timeout=120)
    assert other.exitcode == 0
    assert (tmp_path / "results.sqlite-wal").exists()  # the other process saw a live user and left the WAL
    first.put(make_row(seed=1))
    first.close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2  # the second commit was kept
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_garbage_file_raises_and_is_left_untouched(tmp_path):
    path = tmp_path / "results.sqlite"
    garbage = b"this is not a database\n" + bytes(range(256)) * 20
    path.write_bytes(garbage)
    with pytest.raises(StoreCorruptError) as e:
        ResultsStore(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]  # no -wal/-shm/journal


def test_foreign_sqlite_and_damaged_store_raise(tmp_path):
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreCorruptError, match="without bench_suite tables"):
        ResultsStore(foreign)
    assert foreign.read_bytes() == before

    good = tmp_path / "good.sqlite"
    with ResultsStore(good) as store:
        for i in range(20):
            store.put(make_row(seed=i))
    with sqlite3.connect(good) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(good.read_bytes())
    data[100:len(data)] = b"\xff" * (len(data) - 100)  # keep the header, wreck the pages
    good.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError):
        ResultsStore(good)
    assert good.read_bytes() == bytes(data)


def test_update_metrics_merges_and_keeps_the_rest(tmp_path):
    row = make_row()
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.put(row)
        before = store.get(row["key"])
        assert store.update_metrics(row["key"], {"img_per_s": 123.0, "speed_pass": 20261202120000},
                                    {"img_per_s": "img/s", "speed_pass": "UTC time (YYYYMMDDhhmmss)"})
        assert not store.update_metrics("0" * 16, {"img_per_s": 1.0})
        after = store.get(row["key"])
    assert after["created"] == before["created"] and after["config"] == before["config"]
    assert after["metrics"] == {**before["metrics"], "img_per_s": 123.0, "speed_pass": 20261202120000}
    assert after["units"]["img_per_s"] == "img/s" and after["units"]["top1"] == "%"
