"""Command line: ``python -m bench_suite {list,run,teacher,report,tables,visualize,speed}``.

Every subcommand accepts ``--config FILE`` (YAML/JSON with the same keys as the options), through
jsonargparse. Errors a user can fix are printed as one line ``bench_suite: error: ...`` with exit
status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from jsonargparse import ActionConfigFile
from jsonargparse import ArgumentParser as _JsonArgumentParser

from bench_suite import signals
from bench_suite.allocator import ALLOCATOR_MODES, use_allocator
from bench_suite.backbones import PROFILES
from bench_suite.distributed import SUPPORTED_STRATEGIES, start_processes, world_info
from bench_suite.errors import UserError
from bench_suite.locks import ConfigLock
from bench_suite.logs import quiet_lightning_info
from bench_suite.options import (
    COMPILE_MODES,
    PRECISIONS,
    ClipValue,
    KeepRate,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    parse_devices,
)
from bench_suite.paper.data import TABLES, run_plan
from bench_suite.paper.run import make_tables
from bench_suite.paper.visualize import FIGURE3_METHOD, visualize
from bench_suite.pareto import X_AXES, pareto_table, summary_text
from bench_suite.plan import check_output, make_datamodule, setup_data, train_settings
from bench_suite.registry import method_specs
from bench_suite.report import write_report
from bench_suite.runner import run_benchmark
from bench_suite.speed import run_command as run_speed_command
from bench_suite.store import STORE_FILENAME, ResultsStore
from bench_suite.teacher import ASSETS_DIR, install_shipped, train_teacher
from datamodules import DATAMODULES

__all__ = ["main", "build_parser"]


class ArgumentParser(_JsonArgumentParser):
    """jsonargparse's parser raising ``argparse.ArgumentError`` instead of printing usage and exiting, so
    that a bad option or a malformed ``--config`` file becomes one line (see :func:`main`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)


def _common(p: ArgumentParser, *, profile: str | None = "mini", data: str = "read", output: str = "results",
            seed: bool = False, processes: bool = False) -> None:
    """The options subcommands share, declared once: ``--config``; ``--profile`` (``None``: a filter, default
    all); ``--data`` and, with ``data="read"``, ``--data-dir`` (``data="filter"``: a filter, default all;
    ``"none"``: no data options); ``--output``; ``--seed``; with ``processes`` the Lightning process options
    (devices, nodes, strategy, accelerator, loader workers, progress bars)."""
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file with any of these options")
    if profile is None:
        p.add_argument("--profile", type=str | None, default=None, help="only rows of this profile")
    else:
        p.add_argument("--profile", type=str, default=profile, help="backbone profile (see 'list')")
    if data == "filter":
        p.add_argument("--data", type=str | None, default=None, help="only rows of this dataset")
    elif data == "read":
        p.add_argument("--data", type=str, default="fashion_mnist", help="dataset: " + " or ".join(sorted(DATAMODULES)))
        p.add_argument("--data-dir", type=str | None, default=None, help="folder holding the dataset")
    p.add_argument("--output", type=str, default=output, help="results folder (store, tables, plots)")
    if seed:
        p.add_argument("--seed", type=NonNegativeInt, default=0, help="global seed (weights, data order, random inputs)")
    if processes and data == "read":  # the commands that train: the data's split and training recipe
        p.add_argument("--val-size", type=PositiveInt | None, default=None,
                       help="training images held out for validation (default: the dataset's: 5000 Fashion-MNIST, "
                            "10000 ImageFolder)")
        p.add_argument("--augmentation", type=str | None, default=None,
                       help='JSON object over DeiT\'s training recipe of ImageFolder data (keys auto_augment, re_prob, '
                            'mixup, cutmix, smoothing; default {"auto_augment": "rand-m9-mstd0.5-inc1", '
                            '"re_prob": 0.25, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1})')
    if processes:
        p.add_argument("--devices", type=str, default="1", help="Lightning devices ('auto', N, or a list)")
        p.add_argument("--num-nodes", type=PositiveInt, default=1, help="Lightning num_nodes")
        p.add_argument("--strategy", type=str, default="auto", choices=list(SUPPORTED_STRATEGIES),
                       help="Lightning strategy: " + ", ".join(SUPPORTED_STRATEGIES))
        p.add_argument("--accelerator", type=str, default="auto", choices=["auto", "cpu", "gpu", "cuda", "mps"],
                       help="Lightning accelerator: auto, cpu, gpu, cuda, mps")
        p.add_argument("--num-workers", type=NonNegativeInt | None, default=None,
                       help="DataLoader worker processes per process (default: 0 for in-memory Fashion-MNIST, the "
                            "usable CPUs up to 8 for ImageFolder data)")
        p.add_argument("--no-progress", action="store_true", help="hide progress (bars on a terminal, lines otherwise)")
        p.add_argument("--logger", type=str, default="csv",
                       help="training logs under runs/<run>/logs: csv, tensorboard or csv,tensorboard")


def _allocator_option(p: ArgumentParser) -> None:
    p.add_argument("--allocator", type=str, default="retain", choices=list(ALLOCATOR_MODES),
                   help="memory allocator of this process: retain (glibc keeps freed memory, as jemalloc/tcmalloc "
                        "do: no page faults in a warmed-up forward) or system (glibc's defaults); recorded in every "
                        "row's versions")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench_suite", description=(
        "Benchmark efficient-attention methods for ViTs: at the same MHSA FLOPs, which keeps the most top-1?"))
    sub = parser.add_subcommands(dest="command", required=True)

    p_list = ArgumentParser(description="List registered methods (with default settings) and profiles.")
    sub.add_subcommand("list", p_list, help="list methods and profiles")

    p_run = ArgumentParser(description="Fine-tune and evaluate methods at their keep rates; write the "
                                       "results store, the Pareto table and plot.")
    p_run.add_argument("--methods", type=str | None, default=None,
                       help="comma-separated method names (default: the methods of the default run, see 'list')")
    p_run.add_argument("--keep-rates", type=str | None, default=None,
                       help="comma-separated keep rates (default: each method's own grid)")
    p_run.add_argument("--epochs", type=NonNegativeInt | None, default=None,
                       help="fine-tuning epochs (default: profile's; 0: evaluate only)")
    p_run.add_argument("--train-subset", type=NonNegativeInt | None, default=None,
                       help="train on this many images (default: profile's; 0 = all)")
    p_run.add_argument("--batch-size", type=PositiveInt | None, default=None, help="images per batch (default: profile's)")
    p_run.add_argument("--teacher", type=str | None, default=None, help="teacher checkpoint to use")
    p_run.add_argument("--force", action="store_true", help="re-run configurations already in the store")
    p_run.add_argument("--checkpoint-every", type=NonNegativeInt | None, default=None,
                       help="save the resumable checkpoint every N optimiser steps (default 50; 0: epoch ends only)")
    p_run.add_argument("--no-augment", action="store_true",
                       help="fine-tune without training augmentation (Fashion-MNIST: random crop/flip; ImageFolder: DeiT's recipe, see --augmentation; the teacher keeps its recipe's)")
    p_run.add_argument("--hparams", type=str | None, default=None,
                       help='JSON object of method settings, {"<method>": {"<setting>": value}} (see list); '
                            'a changed setting is a new configuration')
    p_run.add_argument("--seeds", type=str | None, default=None,
                       help="fine-tune every configuration once per seed, e.g. 0,1,2 (resumable; one teacher, that of "
                            "--seed, for all); the Pareto table shows mean, standard deviation and n")
    p_run.add_argument("--precision", type=str, default="32", choices=list(PRECISIONS),
                       help="Lightning precision of fine-tuning and evaluation: 32, bf16-mixed or 16-mixed (GPU); "
                            "part of every row's configuration")
    p_run.add_argument("--accumulate-grad-batches", type=PositiveInt, default=1,
                       help="accumulate gradients over N batches per optimiser step (Lightning)")
    p_run.add_argument("--gradient-clip-val", type=ClipValue, default=0.0,
                       help="clip the gradient norm at this value (0: no clipping; Lightning)")
    p_run.add_argument("--compile", type=str, default="none", choices=list(COMPILE_MODES),
                       help="torch.compile the model being trained in this mode (default none: eager); part of every "
                            "row's configuration when set")
    p_run.add_argument("--x", type=str, default="mhsa_mflops", choices=list(X_AXES), help="x axis of the Pareto plot")
    p_run.add_argument("--table", type=int | None, default=None, choices=[None, *TABLES],
                       help="run exactly the configurations of the paper's table N (1-4) on --profile "
                            "(replaces --methods/--keep-rates)")
    _common(p_run, seed=True, processes=True)
    _allocator_option(p_run)
    sub.add_subcommand("run", p_run, help="train/evaluate methods and write Pareto tables and plots")

    p_teacher = ArgumentParser(description="Train the full-attention teacher from scratch and cache it.")
    p_teacher.add_argument("--ship", action="store_true",
                           help="also copy it into the package's shipped teachers (maintainers)")
    _common(p_teacher, seed=True, processes=True)
    sub.add_subcommand("teacher", p_teacher, help="(re-)create the full-attention teacher")

    p_report = ArgumentParser(description="Rewrite the Pareto table and plot from the results store.")
    p_report.add_argument("--x", type=str, default="mhsa_mflops", choices=list(X_AXES), help="x axis of the Pareto plot")
    _common(p_report, profile=None, data="filter")
    sub.add_subcommand("report", p_report, help="rewrite tables and plots from the store")

    p_tables = ArgumentParser(description=(
        "Regenerate the paper's Tables 1-4 (Wei et al., CVPR 2023) beside the paper's numbers: MHSA FLOPs counted now at paper "
        "scale (DeiT-S, LV-ViT-S, DeiT-T-384; random weights), top-1 from the results store of --profile/--data. "
        "Writes <output>/tables/table<N>.{md,csv,tex}, Figures 3-7 and <output>/report.html, report.md."))
    p_tables.add_argument("--table", type=int | None, default=None, choices=[None, *TABLES], help="only table N (1-4); default: all and the report page")
    _common(p_tables)  # --data: whose stored top-1 the rows show (each from its own backbone); a proxy --profile: own tables
    p_tables.add_argument("--no-figures", action="store_true", help="skip Figures 3-7")
    sub.add_subcommand("tables", p_tables, help="the paper's Tables 1-4 and Figures 3-7, beside the paper's numbers")

    p_vis = ArgumentParser(description="Save a trained model's attention maps of a query patch per layer and head "
                                       "(the paper's Fig. 3: connectivity mask, sparse and full attention) as PNG "
                                       "in <output>/figures.")
    p_vis.add_argument("--method", type=str, default=FIGURE3_METHOD, help="a registered method (see 'list')")
    p_vis.add_argument("--keep-rate", type=KeepRate, default=0.25, help="keep rate of the configuration")
    p_vis.add_argument("--checkpoint", type=str | None, default=None,
                       help="Lightning checkpoint (default: the runner's one for this configuration)")
    p_vis.add_argument("--images", type=PositiveInt, default=4, help="number of test images")
    p_vis.add_argument("--query", type=NonNegativeInt | None, default=None, help="query patch index (default: centre)")
    _common(p_vis)
    sub.add_subcommand("visualize", p_vis, help="plot a trained model's attention maps (the paper's Fig. 3)")

    p_speed = ArgumentParser(description=(
        "Wall-clock eval speed on the CPU: latency (median, p90), throughput and peak memory of methods "
        "(default; random weights or --weights store; a grid over --batch-size, --threads and --precision, "
        "written as speed_grid.{csv,md,png}), of one MHSA core (--core), or the sparse attention kernel against "
        "dense SDPA (--kernel, writes kernel.csv). Rows go to <output>/results.sqlite and speed.csv."))
    _common(p_speed, profile="deit_t384", data="none", seed=True)
    _allocator_option(p_speed)
    p_speed.add_argument("--methods", type=str | None, default=None,
                         help="comma-separated method names (default: all registered)")
    p_speed.add_argument("--keep-rates", type=str | None, default=None,
                         help="comma-separated keep rates (default: each method's grid; core/kernel 0.25,0.1,0.05)")
    p_speed.add_argument("--batch-size", type=str, default="8",
                         help="images (sequences) per timed batch; models: a grid, e.g. 1,8,64,max (max: the largest "
                              "power of two whose predicted peak memory fits --memory-budget)")
    p_speed.add_argument("--threads", type=str | None, default=None,
                         help="intra-op threads, fixed and recorded; models: a grid, e.g. 1,all (default: torch's, "
                              "usually all cores)")
    p_speed.add_argument("--precision", type=str, default="fp32",
                         help="models: fp32 and/or bf16 (autocast; where the CPU has bf16 instructions), e.g. fp32,bf16")
    p_speed.add_argument("--weights", type=str, default="random", choices=["random", "store"],
                         help="models: random weights, or the newest trained checkpoint of each configuration in "
                              "<output>/results.sqlite where one exists (real sparsity)")
    p_speed.add_argument("--max-batch", type=PositiveInt, default=1024, help="the largest batch --batch-size max tries")
    p_speed.add_argument("--memory-budget", type=PositiveInt | None, default=None,
                         help="MiB that --batch-size max may fill (default: half the memory available now)")
    p_speed.add_argument("--repeats", type=PositiveInt, default=10, help="timed rounds (candidates interleaved)")
    p_speed.add_argument("--warmup", type=NonNegativeInt, default=3, help="untimed runs per candidate first")
    p_speed.add_argument("--impl", type=str, default="cpp",
                         help="sparse attention implementation(s) of methods that have one: cpp, torch or cpp,torch")
    p_speed.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p_speed.add_argument("--core", action="store_true", help="time one MHSA core instead of whole models")
    p_speed.add_argument("--kernel", action="store_true",
                         help="time the sparse attention kernel against dense SDPA on the N x keep-rate grid")
    p_speed.add_argument("--train", action="store_true",
                         help="time training steps of whole models (forward, teacher, losses, backward, AdamW; each "
                              "method in its main training phase), interleaved; with --kernel: the kernel's forward + "
                              "backward against dense SDPA and the gather path")
    p_speed.add_argument("--build", action="store_true", help="compile the C++ kernel (or find it cached) and exit")
    p_speed.add_argument("--n", type=PositiveInt | None, default=None, help="--core: tokens N (default: the profile's)")
    p_speed.add_argument("--heads", type=PositiveInt | None, default=None,
                         help="--core/--kernel: heads (default: the profile's / DeiT-T's 3)")
    p_speed.add_argument("--head-dim", type=PositiveInt | None, default=None,
                         help="--core/--kernel: head dim (default: the profile's / DeiT-T's 64)")
    p_speed.add_argument("--kernel-n", type=str, default="197,577,2305", help="--kernel: comma-separated N values")
    p_speed.add_argument("--hparams", type=str | None, default=None,
                         help='JSON object of method settings, as for run: {"<method>": {"<setting>": value}}')
    p_speed.add_argument("--coef-density", type=OpenUnitInterval | None, default=None,
                         help="emulate a trained predictor's density of sparse coefficients (paper: 0.13) with "
                              "random weights (methods that have such coefficients)")
    sub.add_subcommand("speed", p_speed, help="wall-clock latency/throughput/memory; sparse kernel vs dense")
    return parser


def _cmd_list(cfg: Any) -> None:
    print("Methods (name, default keep rates, source; * = in the default run):")
    paper = [p.name for p in PROFILES.values() if p.paper_recipes]
    for spec in method_specs():
        rates = ", ".join(f"{r:g}" for r in spec.keep_rates)
        star = "*" if spec.in_default_run else " "
        print(f"{star} {spec.name:<14} keep rates [{rates}]  ({spec.source})  {spec.description}")
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults().items() if k != "keep_rate")
        print(f"  {'':<14} defaults: {defaults}")
        if spec.paper_recipe:
            recipe = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in spec.paper_recipe.items())
            print(f"  {'':<14} paper recipe (profiles {', '.join(paper)}): {recipe}")
    print("Profiles:")
    for p in PROFILES.values():
        recipe = "each method's paper recipe" if p.paper_recipes else \
            f"{p.epochs} epoch(s) on {p.train_subset or 'all'} images for every method"
        print(f"  {p.name:<10} {p.model} @ {p.img_size}px: {p.description}; batch {p.batch_size}, {recipe}")


def _cmd_teacher(cfg: Any) -> None:
    if start_processes(train_settings(cfg, epochs=0))[1] > 1:
        raise UserError("the teacher is trained in one process: drop --devices/--num-nodes here (multi-process "
                        "'run' sweeps use the cached teacher, or train it in one process first)")
    dm = make_datamodule(cfg, train_subset=None)
    setup_data(cfg, dm)
    check_output(Path(cfg.output))
    path = train_teacher(cfg.profile, dm, cfg.seed, cfg.output, train_settings(cfg, epochs=0),
                         command="python -m bench_suite " + " ".join(sys.argv[1:] or ["teacher"]))
    print(f"teacher written to {path}")
    print(f"manifest: {path.parent / 'manifest.json'}")
    if cfg.ship:
        dest = ASSETS_DIR / path.parent.name
        install_shipped(path, dest / "teacher.ckpt")
        install_shipped(path.parent / "manifest.json", dest / "manifest.json")
        print(f"shipped copy: {dest}")


def _cmd_run(cfg: Any) -> int:
    """Run the sweep (``--table N``: exactly the configurations of the paper's table N), then write and print
    the Pareto table and plot (rank 0 of a multi-process run)."""
    plan = run_plan(cfg.table) if cfg.table is not None else None
    rows = run_benchmark(cfg, plan=plan, skip_infeasible=plan is not None)
    if world_info()[0] != 0:
        return 0
    failed = sum(1 for r in rows if r["status"] != "ok")
    with ConfigLock(Path(cfg.output) / "locks" / "report.lock"):  # two sweeps of one folder: one writer at a time
        paths = write_report(cfg.output, x=cfg.x, profile=cfg.profile, dataset=cfg.data)
    with ResultsStore(Path(cfg.output) / STORE_FILENAME) as store:
        table = pareto_table(store.rows(profile=cfg.profile, dataset=cfg.data), x=cfg.x)
    print()
    print(summary_text(table))
    print()
    for p in paths:
        print(f"wrote {p}")
    if failed:
        print(f"bench_suite: {failed} configuration(s) failed (rows with status 'failed'); re-run to retry them",
              file=sys.stderr)
        return 1
    return 0


def _cmd_report(cfg: Any) -> None:
    for p in write_report(cfg.output, x=cfg.x, profile=cfg.profile, dataset=cfg.data):
        print(f"wrote {p}")


def _cmd_tables(cfg: Any) -> None:
    run = make_tables(cfg.output, tables=cfg.table, profile=cfg.profile, data=cfg.data, data_dir=cfg.data_dir,
                      figures=not cfg.no_figures and cfg.table is None,
                      command="python -m bench_suite " + " ".join(sys.argv[1:] or ["tables"]))
    if cfg.table is not None:
        print()
        print(run.tables[cfg.table].paths[0].read_text(encoding="utf-8"))
    for p in run.paths:
        print(f"wrote {p}")
    print(f"bench_suite tables: done in {run.seconds:.1f} s")


def _cmd_visualize(cfg: Any) -> None:
    for p in visualize(cfg.method, cfg.keep_rate, cfg.output, cfg.checkpoint, cfg.images, cfg.query,
                       cfg.profile, cfg.data, cfg.data_dir):
        print(f"wrote {p}")


def _cmd_speed(cfg: Any) -> None:
    run_speed_command(cfg)


COMMANDS = {"list": _cmd_list, "run": _cmd_run, "teacher": _cmd_teacher, "report": _cmd_report,
            "visualize": _cmd_visualize, "speed": _cmd_speed, "tables": _cmd_tables}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench_suite``; returns the exit status: 0, 1 (some configuration failed),
    2 (an error the user can fix, one line), 130 / 143 (stopped by SIGINT / SIGTERM, see
    :mod:`bench_suite.signals`)."""
    signals.install()
    try:
        return _main(argv)
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and signals.received() is None:
            raise  # a real exit, not a stop
        print(signals.stop_message(getattr(e, "progress", "")), file=sys.stderr)
        return signals.exit_code()


def _empty_config(argv: Sequence[str]) -> str | None:
    """The first ``--config FILE`` of ``argv`` that is an empty (or blank) file, if any."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else \
            (arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path and Path(path).is_file() and not Path(path).read_text(encoding="utf-8", errors="replace").strip():
            return path
    return None


def _main(argv: Sequence[str] | None) -> int:
    args = list(argv) if argv is not None else sys.argv[1:]
    empty = _empty_config(args)
    if empty is not None:
        print(f"bench_suite: error: --config {empty} is empty; write the options as YAML/JSON keys "
              f"(e.g. 'epochs: 1') or leave --config out", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        cfg = parser.parse_args(list(argv) if argv is not None else None)
    except argparse.ArgumentError as e:
        args = list(argv) if argv is not None else sys.argv[1:]
        print(f"bench_suite: error: {_option_error(e, args)} (see python -m bench_suite --help)", file=sys.stderr)
        return 2
    command = cfg.command
    sub_cfg = cfg[command]
    if command in ("run", "teacher"):
        quiet_lightning_info()
    try:
        if "devices" in sub_cfg:
            sub_cfg.devices = parse_devices(sub_cfg.devices)
        if "allocator" in sub_cfg:  # process-wide, before anything is allocated for a model
            use_allocator(sub_cfg.allocator)
        status = COMMANDS[command](sub_cfg)
    except UserError as e:
        print(f"bench_suite: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return int(status or 0)


_TYPE_PHRASES = {"NonNegativeInt": "a whole number >= 0", "PositiveInt": "a whole number >= 1",
                 "KeepRate": "a number in (0, 1]", "OpenUnitInterval": "a number in (0, 1)"}


def _option_error(e: BaseException, argv: Sequence[str]) -> str:
    """A parser error as one short line: ``--epochs must be a whole number >= 0, got '-1'`` for a value the
    option's type refuses (jsonargparse's own message otherwise, on one line)."""
    text = str(e)
    key = re.search(r'Parser key "([\w.]+)"', text)
    kind = next((phrase for name, phrase in _TYPE_PHRASES.items() if name in text), None)
    if key is None or kind is None:
        return _one_line(e)
    option = "--" + key.group(1).rsplit(".", 1)[-1].replace("_", "-")
    given = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            given = argv[i + 1]
        elif arg.startswith(option + "="):
            given = arg.split("=", 1)[1]
    return f"{option} must be {kind}" + ("" if given is None else f", got {given!r}")


def _one_line(e: BaseException) -> str:
    """An error message as one line (YAML parser and jsonargparse messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
