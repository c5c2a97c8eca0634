"""Every option of every subcommand, driven with bad values: exit status 2, one line on stderr, no traceback,
nothing written. The options are read from the parser itself, so a new option without bad values here fails
``test_every_option_has_bad_values``. Plus: one key per configuration whatever its spelling (hypothesis),
and the small faults of the environment (kernel build, memory, stores, data files)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench_suite.cli import build_parser, main
from tests.conftest import have_fashion_mnist

NOT_A_FILE = "/nonexistent/bench_suite/nothing"
FILE = "@file"      # placeholder: a regular file made by the test
CKPT = "@notckpt"   # placeholder: a file that is not a checkpoint
COUNT = ["-1", "abc", "1.5", "", "nan"]          # whole numbers >= 0
POSITIVE = ["0", "-1", "abc", "", "inf"]         # whole numbers >= 1
RATE = ["0", "-0.5", "1.5", "nan", "inf", "abc", ""]
COMMON = {
    "--profile": ["huge", ""], "--data": ["mnist", ""], "--data-dir": [NOT_A_FILE, FILE], "--output": [FILE],
    "--seed": ["-1", "abc", ""], "--devices": ["0", "-2", "abc", ""], "--num-nodes": ["0", "-1", "abc"],
    "--strategy": ["ddp_spawn", ""], "--accelerator": ["quantum", ""], "--num-workers": ["-1", "abc"],
    "--logger": ["wandb", "", "csv,nope"], "--val-size": POSITIVE,
    "--augmentation": ["{", "[1]", '{"mixup": 0}'],  # the last: Fashion-MNIST (the default data) has no such setting
}
BAD: dict[str, dict[str, list[str]]] = {
    "run": {**COMMON, "--methods": ["nosuch", ",", "evit,nosuch"], "--keep-rates": RATE[:-1] + [","],
            "--epochs": COUNT, "--train-subset": COUNT, "--batch-size": POSITIVE, "--teacher": [NOT_A_FILE, "/tmp"],
            "--checkpoint-every": ["-1", "abc", ""], "--x": ["bogus", ""], "--table": ["0", "5", "abc"],
            "--seeds": ["-1", "abc", "0,0", ",", "1.5", "0,-2"],
            "--precision": ["64", "bf16", ""], "--accumulate-grad-batches": POSITIVE,
            "--gradient-clip-val": ["-1", "abc", "nan", "inf", ""], "--compile": ["fast", "true", ""],
            "--hparams": ["{", "[1]", '{"evit": {"lr": NaN}}', '{"evit": {"lr": Infinity}}', '{"evit": {"lr": "fast"}}',
                          '{"evit": {"nope": 1}}', '{"evit": 3}', '{"full": {}}'],
            "--allocator": ["jemalloc", ""]},
    "teacher": {k: v for k, v in COMMON.items()},
    "report": {"--x": ["bogus", ""], "--profile": ["huge"], "--data": ["mnist"], "--output": [NOT_A_FILE, FILE]},
    "tables": {"--table": ["0", "5", "abc"], "--profile": ["huge", ""], "--data": ["mnist", ""],
               "--data-dir": [NOT_A_FILE, FILE], "--output": [FILE]},
    "visualize": {"--method": ["nosuch", ""], "--keep-rate": RATE, "--checkpoint": [NOT_A_FILE, CKPT],
                  "--images": POSITIVE, "--query": ["-1", "abc", "1.5"], "--profile": ["huge", ""],
                  "--data": ["mnist", ""], "--data-dir": [NOT_A_FILE, FILE], "--output": [FILE]},
    "speed": {"--profile": ["huge", ""], "--output": [FILE], "--seed": ["-1", "abc"], "--methods": ["nosuch", ","],
              "--keep-rates": ["0", "nan", "1.5", "abc"], "--batch-size": POSITIVE + ["1,max,x"],
              "--threads": POSITIVE + ["1,none"],
              "--repeats": POSITIVE, "--warmup": ["-1", "abc", ""], "--impl": ["cuda", "", "cpp,gpu"],
              "--n": POSITIVE, "--heads": POSITIVE, "--head-dim": POSITIVE, "--kernel-n": ["0", "abc", "", "-5"],
              "--hparams": ["{", "[1]", '{"full": {"n_down": 8}}', '{"full": {"lr": NaN}}'],
              "--coef-density": ["0", "1", "nan", "abc", "-0.1"], "--precision": ["fp8", "", "fp32,int8"],
              "--weights": ["trained", ""], "--max-batch": POSITIVE, "--memory-budget": POSITIVE,
              "--allocator": ["jemalloc", ""]},
}
BASE = {"run": ["--methods", "evit", "--profile", "tiny"], "teacher": ["--profile", "tiny"], "report": [],
        "tables": ["--table", "2"], "visualize": ["--profile", "tiny"], "speed": ["--profile", "tiny", "--methods", "full"]}
FLAGS = {"--config", "--print_config", "-h", "--help", "--force", "--no-augment", "--no-progress", "--ship",
         "--no-figures", "--no-memory", "--core", "--kernel", "--train", "--build"}


def _options(command: str) -> set[str]:
    sub = build_parser()._subcommands_action._name_parser_map[command]
    return {a.option_strings[0] for a in sub._actions if a.option_strings} - FLAGS


def test_every_option_has_bad_values():
    for command in BAD:
        assert _options(command) == set(BAD[command]), command  # a new option needs its bad values here


CASES = [(cmd, opt, value) for cmd, opts in BAD.items() for opt, values in opts.items() for value in values]
needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")


@needs_data
@pytest.mark.parametrize("command, option, value", CASES, ids=[f"{c} {o}={v!r}" for c, o, v in CASES])
def test_bad_value_exit_2_one_line_nothing_written(tmp_path, capsys, command, option, value):
    regular = tmp_path / "a_file.txt"
    regular.write_text("not a folder")
    not_ckpt = tmp_path / "model.ckpt"
    not_ckpt.write_bytes(b"this is not a checkpoint")
    value = {FILE: str(regular), CKPT: str(not_ckpt)}.get(value, value)
    out = tmp_path / "out"
    args = [command, *BASE[command], *(["--output", str(out)] if option != "--output" else []), option, value]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (args, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("bench_suite: error: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    assert regular.read_text() == "not a folder" and not_ckpt.read_bytes() == b"this is not a checkpoint"


# ----------------------------------------------------------------------------------------- one key per configuration
SETTINGS = {  # (setting, default, spellings of one other value) of the sparsifiner method
    "tau": (0.05, [0.2, 0.20000]), "phase1_frac": (0.1, [0.5]), "n_down": (None, [8]),
    "cls_full_row": (True, [False]), "predictor_lr": (1e-2, [1, 1.0]), "coef_topk": (8, [4, 4.0]),
}


def _key(overrides: dict) -> str:
    from bench_suite.plan import resolve_plan, train_config
    from bench_suite.store import config_key

    [(spec, rate, canon)] = resolve_plan([("sparsifiner", 0.25, overrides)])
    return config_key(train_config(spec, rate, canon, {"profile": "tiny", "seed": 0}, epochs=1))


@settings(max_examples=60, deadline=None)
@given(chosen=st.dictionaries(st.sampled_from(sorted(SETTINGS)), st.booleans()), data=st.data())
def test_equal_configurations_have_one_key_whatever_their_spelling(chosen, data):
    """A configuration (some settings changed, True = changed) spelled two random ways: values as int or
    float, defaults written out or left out, keys in any order -> one key; a changed value -> another key."""
    from bench_suite.registry import get_method

    defaults = get_method("sparsifiner").defaults()

    def spell() -> dict:
        out = {}
        for name, changed in chosen.items():
            default, others = SETTINGS[name]
            assert defaults[name] == default
            if changed:
                out[name] = data.draw(st.sampled_from(others))
            elif data.draw(st.booleans()):  # write the default out, as int or float where that is the same
                out[name] = data.draw(st.sampled_from([default, int(default)] if isinstance(default, float)
                                                      and float(default).is_integer() else [default]))
        keys = list(out)
        order = data.draw(st.permutations(keys))
        return {k: out[k] for k in order}

    a, b = spell(), spell()
    assert _key(a) == _key(b), (a, b)
    if any(chosen.values()):
        assert _key(a) != _key({})  # a changed setting is a new configuration


def test_canonical_settings_spellings():
    from bench_suite.errors import UserError
    from bench_suite.options import canonical_settings

    defaults = {"lr": 5e-4, "k": 3, "flag": True, "size": None, "stages": (1, 2)}
    assert canonical_settings("m", {"lr": 0.0005, "k": 3.0, "flag": True}, defaults) == {}
    assert canonical_settings("m", {"lr": 1, "k": 4.0, "size": 2, "stages": [1, 2]}, defaults) == {"lr": 1.0, "k": 4,
                                                                                                     "size": 2}
    for bad in ({"lr": "fast"}, {"k": 2.5}, {"flag": 1}, {"nope": 1}, {"lr": float("nan")}):
        with pytest.raises(UserError):
            canonical_settings("m", bad, defaults)


@needs_data
def test_hparams_equal_to_the_default_reuse_the_row(tmp_path, capsys):
    from tests.test_resume import quick_teacher

    teacher = quick_teacher(tmp_path.parent)
    base = ["run", "--profile", "tiny", "--methods", "evit", "--keep-rates", "0.5", "--epochs", "0", "--train-subset",
            "64", "--accelerator", "cpu", "--no-progress", "--teacher", str(teacher), "--output", str(tmp_path / "o")]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--hparams", '{"evit": {"lr": 0.0005, "distill_logits": 0.5}}']) == 0
    assert "already in the store" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- faults of the environment
def test_explicit_cpp_without_a_compiler_fails_before_training(tmp_path, capsys, monkeypatch):
    from bench_suite.kernels import loader

    monkeypatch.setattr(loader, "_loaded", False)
    monkeypatch.setattr(loader, "_load_error", None)
    monkeypatch.setattr(loader, "_compiler", lambda: None)
    code = main(["run", "--profile", "tiny", "--methods", "sparsifiner", "--hparams",
                 '{"sparsifiner": {"attention_impl": "cpp"}}', "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no C++ compiler" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unwritable_extensions_folder_falls_back_under_auto(monkeypatch):
    import torch

    from bench_suite import kernels
    from bench_suite.errors import KernelBuildError
    from bench_suite.kernels import loader

    class NoBuildDir:
        @staticmethod
        def verify_ninja_availability():
            return None

        @staticmethod
        def _get_build_directory(name, verbose=False):
            raise PermissionError(13, "Permission denied", "/root/.cache/torch_extensions")

    monkeypatch.setattr(loader, "_loaded", False)
    monkeypatch.setattr(loader, "_load_error", None)
    monkeypatch.setattr(loader, "_cpp_extension", lambda: NoBuildDir)
    monkeypatch.setattr(kernels, "_auto_warned", False)
    with pytest.raises(KernelBuildError, match="TORCH_EXTENSIONS_DIR"):
        loader.load_kernel()
    q = torch.randn(1, 1, 5, 8)
    idx = torch.arange(2).expand(1, 1, 5, 2).contiguous()
    with pytest.warns(RuntimeWarning, match="falls back"):
        out = kernels.sparse_attention(q, q, q, idx, impl="auto")
    torch.testing.assert_close(out, kernels.sparse_attention_torch(q, q, q, idx))


def test_speed_refuses_what_would_not_fit_in_memory(tmp_path, capsys):
    assert main(["speed", "--core", "--n", "3000000", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--n 3000000 needs about" in err and "GiB available" in err and not (tmp_path / "o").exists()


def test_readers_never_write_into_an_empty_store(tmp_path, capsys):
    store = tmp_path / "results.sqlite"
    store.write_bytes(b"")
    for args in (["report"], ["visualize", "--profile", "tiny"]):
        assert main([*args, "--output", str(tmp_path)]) == 2
        assert "an empty file" in capsys.readouterr().err
    assert store.stat().st_size == 0


def test_malformed_stored_row_is_one_line(tmp_path, capsys):
    import sqlite3

    from bench_suite.store import ResultsStore

    ResultsStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    cols = [r[1] for r in conn.execute("PRAGMA table_info(results)")]
    values = {c: None for c in cols} | {"key": "k", "status": "ok", "method": "evit", "keep_rate": 0.5,
                                        "profile": "tiny", "dataset": "fashion_mnist", "seed": 0,
                                        "created": "2026-01-01", "git": "x"}
    for c in cols:
        if values[c] is None:
            values[c] = "{not json"
    conn.execute(f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                 [values[c] for c in cols])
    conn.commit()
    conn.close()
    assert main(["report", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "results" in err


def _idx(path: Path, type_code: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = bytes([0, 0, type_code, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    path.write_bytes(gzip.compress(header + payload))


@pytest.mark.parametrize("fault, needle", [("float_images", "float32 data"), ("negative_labels", "int8 data"),
                                           ("big_labels", "outside 0..9")])
def test_idx_files_of_another_type_or_labels_out_of_range(tmp_path, capsys, fault, needle):
    import numpy as np

    n = 8
    images = np.zeros((n, 28, 28), dtype=np.uint8).tobytes()
    labels = np.arange(n, dtype=np.uint8)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_code, img_bytes = (0x08, images)
        lab_code, lab_bytes = (0x08, labels.tobytes())
        if fault == "float_images":
            img_code, img_bytes = 0x0D, np.zeros((n, 28, 28), dtype=">f4").tobytes()
        if fault == "negative_labels":
            lab_code, lab_bytes = 0x09, (labels.astype(np.int8) - 3).tobytes()
        if fault == "big_labels":
            lab_bytes = (labels + 5).astype(np.uint8).tobytes()
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", img_code, (n, 28, 28), img_bytes)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", lab_code, (n,), lab_bytes)
    code = main(["run", "--profile", "tiny", "--methods", "evit", "--data-dir", str(tmp_path), "--output",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_empty_config_file_says_so(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_the_suggested_smallest_keep_rate_is_accepted():
    from bench_suite.backbones import get_profile
    from bench_suite.errors import UserError
    from bench_suite.plan import resolve_plan, validate_plan

    with pytest.raises(UserError) as info:
        validate_plan(resolve_plan([("evit", 0.05)]), get_profile("tiny"))
    suggested = float(str(info.value).rsplit("e.g. ", 1)[1].rstrip(")"))
    assert len(validate_plan(resolve_plan([("evit", suggested)]), get_profile("tiny"))) == 1


def test_json_constant_words_are_refused():
    from bench_suite.errors import UserError
    from bench_suite.options import parse_hparams

    for text in ('{"evit": {"lr": NaN}}', '{"evit": {"lr": -Infinity}}'):
        with pytest.raises(UserError, match="finite numbers only"):
            parse_hparams(text, ["evit"])
    assert parse_hparams(json.dumps({"evit": {"lr": 1e-3}}), ["evit"]) == {"evit": {"lr": 1e-3}}


def test_tables_refuse_a_corrupt_store_before_counting(tmp_path, capsys):
    import time

    (tmp_path / "results.sqlite").write_bytes(b"this is not SQLite")
    start = time.perf_counter()
    assert main(["tables", "--output", str(tmp_path)]) == 2
    assert time.perf_counter() - start < 10  # refused at once, not after the paper-scale counts
    err = capsys.readouterr().err
    assert "not a readable bench_suite results database" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tables").exists()


def test_an_optional_setting_takes_null_and_a_plain_one_refuses_it():
    """``coef_topk`` (``int | None``, default 8): JSON null switches to the paper's tau, a new configuration;
    ``tau`` (``float``) refuses null with a one-line message."""
    from bench_suite.errors import UserError
    from bench_suite.plan import resolve_plan

    [(_, _, canon)] = resolve_plan([("sparsifiner", 0.25, {"coef_topk": None, "tau": 0.2})])
    assert canon == {"coef_topk": None, "tau": 0.2}
    assert _key({"coef_topk": None}) != _key({}) and _key({"coef_topk": 8}) == _key({})
    with pytest.raises(UserError, match="tau must be a number, got None"):
        resolve_plan([("sparsifiner", 0.25, {"tau": None})])
