"""What a paper author takes as it is: training logs (selectable loggers, the loss logged however short the
run, plain-line progress in a log file), checkpoints that reload the Lightning way, named run folders."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench_suite.backbones import create_backbone
from bench_suite.logs import LineProgress
from bench_suite.training import TrainSettings, fit_and_test
from datamodules import FashionMNISTDataModule
from datamodules.fashion_mnist import synthetic_idx_dir


def test_both_loggers_and_the_loss_of_a_two_step_run_and_plain_progress(tmp_path, capsys):
    from bench_suite.registry import reference_method

    dm = FashionMNISTDataModule(data_dir=str(synthetic_idx_dir(tmp_path / "data", n_train=96, n_test=16)),
                                img_size=28, batch_size=32, val_size=32, download=False)
    module = reference_method().factory(create_backbone("tiny"), distill_logits=0.0)
    settings = TrainSettings(epochs=1, accelerator="cpu", progress=True, loggers=("csv", "tensorboard"),
                             checkpoint_every_n_steps=None)
    metrics = fit_and_test(module, dm, tmp_path / "run", settings)
    assert metrics["global_step"] == 2  # 64 training images, batch 32: fewer steps than log_every_n_steps
    with open(tmp_path / "run" / "logs" / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss_epoch") for r in rows)  # the training loss is logged however short the run
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))  # TensorBoard, through Lightning
    out = capsys.readouterr().out
    assert "epoch 0: 2/2 steps (100%)" in out and "train/loss" in out
    assert "\r" not in out  # plain lines, no progress-bar frames, when the output is not a terminal


def test_line_progress_prints_about_ten_lines_an_epoch():
    class _Trainer:
        num_training_batches = 79
        global_rank = 0
        current_epoch = 0
        callback_metrics: dict = {}

    bar = LineProgress()
    bar.on_train_epoch_start(_Trainer(), None)
    printed = []
    import builtins

    real = builtins.print
    builtins.print = lambda *a, **k: printed.append(a[0])
    try:
        for i in range(79):
            bar.on_train_batch_end(_Trainer(), None, None, None, i)
    finally:
        builtins.print = real
    assert 9 <= len(printed) <= 11 and printed[-1].startswith("epoch 0: 79/79 steps (100%)")


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_logger_names_are_validated(logger):
    from bench_suite.errors import UserError
    from bench_suite.options import parse_loggers

    assert parse_loggers(logger) == (logger,)
    assert parse_loggers(f"{logger},csv") == tuple(dict.fromkeys((logger, "csv")))
    with pytest.raises(UserError, match="csv and/or tensorboard"):
        parse_loggers(f"{logger},wandb")


def test_run_folders_are_named_by_method_keep_rate_and_key(tmp_path):
    from bench_suite.checkpoints import checkpoint_path, run_dir

    assert run_dir(tmp_path, "evit", 0.5, "abc123").name == "evit-0.5-abc123"
    old = tmp_path / "runs" / "abc123" / "checkpoints" / "last.ckpt"  # a folder made before the names
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    assert checkpoint_path(tmp_path, "abc123", "evit", 0.5) == old
    new = run_dir(tmp_path, "evit", 0.5, "abc123") / "checkpoints" / "last.ckpt"
    new.parent.mkdir(parents=True)
    new.write_bytes(b"x")
    assert checkpoint_path(tmp_path, "abc123", "evit", 0.5) == new


def _check_latex(tex: str, columns: int) -> None:
    """The structure a LaTeX document needs of the table (and what it must not have)."""
    import re
    import shutil
    import subprocess
    import tempfile

    assert tex.count(r"\begin{table}") == 1 and tex.count(r"\end{table}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1, rule
    caption = re.search(r"\\caption\{(.*)\}", tex).group(1)
    assert not caption.startswith("Table")  # LaTeX prints "Table N:" itself
    assert re.search(r"\\label\{tab:[^}]+\}", tex)
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1)
    assert len(spec) == columns
    body = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")]
    rows = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
    assert rows and all(ln.replace(r"\&", "").count("&") == columns - 1 for ln in rows)  # every row fills the table
    assert not re.search(r"(?<!\\)[_%#]", caption)  # specials escaped
    if shutil.which("pdflatex"):  # the real check, where LaTeX is installed
        with tempfile.TemporaryDirectory() as d:
            doc = Path(d) / "t.tex"
            doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + tex
                           + "\\end{document}\n")
            run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=d,
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stdout[-2000:]


def test_pareto_latex_table_is_booktabs_and_compact(tmp_path):
    import pandas as pd

    from bench_suite.pareto import pareto_table, write_table

    rows = pd.DataFrame({"method": ["teacher", "sparsifiner", "sparsifiner", "linformer"],
                         "keep_rate": [1.0, 0.5, 0.25, 0.25], "mhsa_mflops": [7.68, 5.5, 3.7, 4.0],
                         "total_gflops": [0.1, 0.09, 0.08, 0.08], "top1": [90.6, 90.4, 90.2, 82.0],
                         "img_per_s": [500.0, 400.0, 450.0, 480.0], "coef_sparsity": [None, 0.3, 0.29, None],
                         "profile": "mini", "dataset": "fashion_mnist"})
    table = pareto_table(rows)
    md, csv_path, tex = write_table(table, tmp_path, "pareto_mini_fashion_mnist")
    text = tex.read_text()
    header = [ln for ln in text.splitlines() if "Method" in ln][0]
    assert "Throughput" not in header and "GFLOPs" not in header  # compact: the page, not the CSV
    assert "Coef. sparsity (\\%, paper 87)" in header and "Top-1 (\\%)" in header
    assert "Sparsifiner" in text and "sparsifiner" not in text.split("\\midrule")[1]  # display names
    _check_latex(text, columns=header.count("&") + 1)
    assert "img_per_s" in csv_path.read_text().splitlines()[0]  # the full set stays in the CSV
    caption = md.read_text().strip().splitlines()[-1]
    assert "throughput and latency: eval of one batch of 64 test images, median of 5" in caption
    assert "unrecorded hardware" in caption  # these rows say no machine; stored rows do (below)


def test_stored_rows_carry_the_hardware_and_the_caption_names_it():
    from bench_suite.versions import hardware, versions

    hw = hardware()
    assert hw["cpu"] and int(hw["cpus"]) >= 1 and int(hw["threads"]) >= 1 and hw["isa"]
    assert {k: versions()[k] for k in hw} == hw  # in every row's versions
    import pandas as pd

    from bench_suite.pareto import _caption, pareto_table

    rows = pd.DataFrame({"method": ["evit"], "keep_rate": [0.5], "mhsa_mflops": [3.3], "top1": [89.0],
                         "img_per_s": [800.0], "profile": "mini", "dataset": "fashion_mnist",
                         "versions": [versions()]})
    caption = _caption(pareto_table(rows), False)
    assert f"on {hw['cpu']} ({hw['threads']} threads of {hw['cpus']} CPUs" in caption
    assert f"; {versions()['allocator']})" in caption  # and the allocator the speeds were timed under


def test_heatmaps_have_colour_bars_and_class_names():
    import torch

    from bench_suite.paper.visualize import class_label, maps_figure
    from datamodules import FashionMNISTDataModule

    assert class_label(9, FashionMNISTDataModule.class_names) == "Ankle boot" and class_label(3, ()) == "label 3"
    n, heads, grid = 5, 2, (2, 2)
    probs = torch.softmax(torch.randn(1, heads, n, n), -1)
    layers = [{"mask": probs > 0.2, "sparse": probs, "full": probs, "positions": None, "n": n, "budget": 2}
              for _ in range(3)]
    fig = maps_figure(torch.rand(1, 8, 8), layers, 0, 1, grid, "t")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3  # one colour scale per layer row
    assert all(bar.get_ylabel() == "attention" for bar in bars)


def test_report_page_title_promises_only_what_it_shows():
    from types import SimpleNamespace

    from bench_suite.paper.figures import FigureResult
    from bench_suite.paper.page import page_title

    figs = [FigureResult("figure4_paper", "Figure 4 (paper's numbers)", paths=[Path("a.png")]),
            FigureResult("figure4_suite", "Figure 4 (suite)", paths=[Path("b.png")]),
            FigureResult("figure3", "Figure 3 (suite): masks", missing="no trained checkpoint")]
    run = SimpleNamespace(tables={1: None, 2: None, 3: None, 4: None}, figures=figs)
    assert page_title(run) == "Sparsifiner (Wei et al., CVPR 2023): Tables 1-4 and Figure 4, regenerated by bench_suite"
    run = SimpleNamespace(tables={2: None}, figures=[])
    assert page_title(run).endswith(": Table 2, regenerated by bench_suite")


def test_check_labels_say_what_they_compare():
    from bench_suite.paper.tables import _check, _sparsity_text

    assert _check(100.04, 100.0, 1, True, False, "paper rule") == "paper rule vs paper: reproduced"
    assert _check(90.0, 100.0, 1, True, False) == "measured vs paper: MISMATCH"
    assert _check(90.0, 100.0, 1, False, False) == "measured vs paper: not reproducible"
    text = _sparsity_text({"coef_sparsity": 1.0, "w_up_sparsity": 0.42, "mask_density": 0.12, "n_down": 8})
    assert text.startswith("coef. 100% zeros, W_up 42% zeros")
