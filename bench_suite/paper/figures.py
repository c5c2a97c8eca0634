"""Figures 3-7 of the Sparsifiner paper (Wei et al., CVPR 2023), drawn by the suite for the tables page.

* Figure 4 (Pareto frontier, MHSA MFLOPs against top-1, all methods, frontier marked; drawn by
  :func:`bench_suite.report.plot_pareto`) twice, never mixed: ``figure4_paper`` from the paper's numbers
  (ImageNet, DeiT-S rows of Tables 1, 2 and 4, read from the data file) and ``figure4_suite`` from the suite's
  results store (the chosen profile and dataset, counts and top-1 measured by the suite).
* Figure 3: for a query patch (the centre patch, yellow square) of real test images, per layer and head of a
  trained Sparsifiner: the connectivity mask ``M`` of the query row (eq. 3), the sparse attention (eq. 4,
  softmax over the kept keys) and the full attention ``softmax(q k^T / sqrt(d))`` of the same layer and head.
* Figure 5: full attention (a trained ``full`` model, else the Sparsifiner's own dense attention), Linformer's
  low-rank attention and Sparsifiner's sparse attention of the same query, averaged over heads. Linformer's
  attention over tokens is the matrix that really mixes the values, ``P F`` with
  ``P = softmax(Q (E K)^T / sqrt(d))`` (Linformer eq. 7: ``P (F V) = (P F) V``); it can be negative.
* Figure 6: the sparse basis ``W_up`` (thresholded as the model uses it) of the first 6 layers, 24 basis
  vectors each, over the patch grid.
* Figure 7: the sparse basis coefficients ``A~_down`` (eq. 2) of the 5th head (or the last, with fewer heads)
  in every layer for one test image: query tokens (rows) by basis vectors (columns).

Figures 3, 5, 6 and 7 come from trained checkpoints of the results store
(``<output>/runs/<key>/checkpoints/last.ckpt`` of a finished row of the chosen profile and dataset); without
one, the figure is not drawn and :class:`FigureResult` says why and which command trains it. Nothing is
drawn from random weights. Matplotlib's object API with the Agg canvas (no pyplot, no global state).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from bench_suite.backbones import get_profile
from bench_suite.checkpoints import find_checkpoints, load_trained
from bench_suite.errors import ReportError
from bench_suite.plots import plot_pareto
from bench_suite.report import plot_title
from bench_suite.store import STORE_FILENAME, ResultsStore
from datamodules import create_datamodule

__all__ = ["FigureResult", "figure4_paper", "figure4_suite",
           "attention_figures", "make_figures"]

PREFERRED_KEEP = (0.25, 0.5, 0.345, 0.1)  # Sparsifiner checkpoints tried first, in this order


@dataclass
class FigureResult:
    """One figure: ``name`` (file stem), ``title``, ``caption``; ``paths`` (PNG, and PDF for Figure 4) or
    ``missing`` (why it was not drawn, with the command that produces its input)."""

    name: str
    title: str
    caption: str = ""
    paths: list[Path] = field(default_factory=list)
    missing: str | None = None


# --------------------------------------------------------------------------- Figure 4
def figure4_paper(paper_results: pd.DataFrame, out_dir: str | Path) -> FigureResult:
    """Figure 4 from the paper's numbers: MHSA MFLOPs against ImageNet top-1 of the DeiT-S rows of
    Tables 1, 2 and 4 (data file), one colour per method (suite names), the Pareto frontier marked."""
    p = paper_results
    rows = p[(p["backbone"] == "deit_s") & p["table"].isin([1, 2, 4])]
    def label(method: str, role: str, cfg: Any) -> str:
        # each configuration its own curve: the token keep rate of the token-pruning rows is part of the name
        token = dict(cfg.overrides).get("token_keep_rate") if hasattr(cfg, "overrides") else None
        name = method if role == "same" else "sparsifiner + token pruning"
        return name + (f" (token_keep_rate={token:g})" if token is not None else "")

    df = pd.DataFrame({
        "method": [label(m, role, cfg) for m, role, cfg in
                   zip(rows["suite_method"], rows["suite_role"], rows.get("config", [None] * len(rows)))],
        "keep_rate": rows["suite_keep_rate"].astype(float),
        "mhsa_mflops": rows["paper_mhsa_mflops"].astype(float),
        "top1": rows["paper_top1"].astype(float),
    })
    df = df.drop_duplicates(["method", "keep_rate", "mhsa_mflops"], keep="last").reset_index(drop=True)
    name = "figure4_paper"
    title = "Figure 4 (paper's numbers): MHSA MFLOPs vs ImageNet top-1, DeiT-S"
    paths = plot_pareto(df, "mhsa_mflops", out_dir, name, title="Paper's numbers (ImageNet, DeiT-S)")
    caption = ("The paper's MHSA MFLOPs and ImageNet top-1 of every DeiT-S row of Tables 1, 2 and 4 (copied from "
               "the data file, not measured); labels are keep rates (Sparsif-EViT: attention keep rate); dashed: "
               "Pareto frontier. Sparsifiner at keep 0.9/0.8 costs more than dense attention (predictor overhead).")
    return FigureResult(name, title, caption, paths)


def figure4_suite(output: str | Path, profile: str, dataset: str, out_dir: str | Path) -> FigureResult:
    """Figure 4 from the suite's results store: measured MHSA MFLOPs (on ``profile``) against measured test top-1
    on ``dataset`` of every finished configuration, all methods, frontier marked."""
    name = f"figure4_suite_{profile}_{dataset}"
    title = f"Figure 4 (suite): measured MHSA MFLOPs vs measured top-1, {profile} / {dataset}"
    db = Path(output) / STORE_FILENAME
    hint = f"python -m bench_suite run --table 2 --profile {profile} --data {dataset} --output {output}"
    if not db.is_file():
        return FigureResult(name, title, missing=f"no results store at {db}; run `{hint}` (and --table 1, 3, 4)")
    with ResultsStore(db, create=False) as store:
        rows = store.rows(profile=profile, dataset=dataset)
    try:
        paths = plot_pareto(rows, "mhsa_mflops", out_dir, name, title=f"Suite: {plot_title(profile, dataset)}")
    except ReportError as e:
        return FigureResult(name, title, missing=f"{e}; run `{hint}`")
    ok = rows[rows["status"] == "ok"]
    caption = (f"Every finished configuration of the results store on profile {profile}, dataset {dataset} "
               f"({len(ok)} rows, methods {', '.join(sorted(ok['method'].unique()))}): MHSA MFLOPs counted on the "
               f"trained model and test top-1, both measured by the suite; labels are keep rates; dashed: Pareto "
               f"frontier. Not comparable in scale with the paper's ImageNet figure.")
    return FigureResult(name, title, caption, paths)


# --------------------------------------------------------------------------- checkpoints
def _pick(found: list[tuple[float, str, Path]], prefer: Sequence[float]) -> tuple[float, str, Path] | None:
    for rate in prefer:
        for item in found:
            if abs(item[0] - rate) < 1e-9:
                return item
    return found[0] if found else None


# --------------------------------------------------------------------------- attention maps
@torch.no_grad()
def predictor_coefficients(module: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """The sparse basis coefficients ``A~_down`` ``[B, H, Nq, n_down]`` (eq. 2) of every layer."""
    seen: list[torch.Tensor] = []
    preds = [b.attn.predictor for b in module.model.blocks]
    hooks = [p.register_forward_hook(lambda m, a, out: seen.append(out.coef.detach())) for p in preds]
    try:
        module(images)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _grid(vec: torch.Tensor, gh: int, gw: int) -> np.ndarray:
    """A query row over all ``N`` keys (CLS first) -> the patch keys as a ``gh x gw`` image."""
    return vec[1:].reshape(gh, gw).float().numpy()


def _layer_sets(depth: int) -> list[list[int]]:
    """The paper's Figure 3 shows layers 3-5 (first image) and 6-8 (second) of 12; scaled to ``depth``."""
    sets = []
    for start in (depth // 4, depth // 2):
        start = min(start, max(depth - 3, 0))
        sets.append(list(range(start, min(start + 3, depth))))
    return sets


def _new_figure(rows: int, cols: int, w: float = 1.15, h: float = 1.15):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(3.0, w * cols), h * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _show_input(ax: Any, image: torch.Tensor, query: int, gh: int, gw: int) -> None:
    from matplotlib.patches import Rectangle

    img = image.float().mean(0)
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    ax.imshow(img.numpy(), cmap="gray")
    ph, pw = img.shape[0] / gh, img.shape[1] / gw
    qy, qx = divmod(query, gw)
    ax.add_patch(Rectangle((qx * pw - 0.5, qy * ph - 0.5), pw, ph, fill=False, edgecolor="yellow", linewidth=1.5))


def _heat(ax: Any, grid: np.ndarray, query: int, gw: int) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(grid, cmap="viridis", interpolation="nearest")
    qy, qx = divmod(query, gw)
    ax.add_patch(Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, edgecolor="yellow", linewidth=0.8))


def _title(fig: Any, text: str) -> None:
    """A suptitle wrapped to the figure's width (about 15 characters per inch at 9 pt)."""
    import textwrap

    fig.suptitle(textwrap.fill(text, max(30, int(fig.get_figwidth() * 15))), fontsize=9)


def _save(fig: Any, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return [path]


def _figure3(layers: list[dict[str, Any]], images: torch.Tensor, query: int, grid: tuple[int, int], out_dir: Path,
             label: str) -> list[Path]:
    gh, gw = grid
    heads = min(4, layers[0]["mask"].shape[1])
    sets = _layer_sets(len(layers))[: len(images)]
    fig, axes = _new_figure(sum(len(s) for s in sets), 1 + 3 * heads)
    row = 0
    for img_i, layer_ids in enumerate(sets):
        for li in layer_ids:
            layer = layers[li]
            _show_input(axes[row, 0], images[img_i], query, gh, gw)
            axes[row, 0].set_ylabel(f"image {img_i}\nlayer {li}\nB={layer['budget']}/{layer['n']}", fontsize=7)
            for j, name in enumerate(("mask", "sparse", "full")):
                for h in range(heads):
                    ax = axes[row, 1 + j * heads + h]
                    _heat(ax, _grid(layer[name][img_i, h, query + 1], gh, gw), query, gw)
                    if row == 0:
                        ax.set_title(f"{('(b) mask', '(c) sparse', '(d) full')[j]} h{h}", fontsize=7)
            row += 1
    axes[0, 0].set_title("(a) query", fontsize=7)
    _title(fig, f"Figure 3 (suite): {label}")
    return _save(fig, out_dir, "figure3_sparsifiner")


def _figure5(images: torch.Tensor, query: int, grid: tuple[int, int], full: list[torch.Tensor],
             linformer: list[torch.Tensor], sparse: list[torch.Tensor], out_dir: Path, labels: Sequence[str],
             title: str) -> list[Path]:
    gh, gw = grid
    depth = len(sparse)
    layer_ids = sorted({depth // 4, depth // 2, (3 * depth) // 4} & set(range(depth)))
    fig, axes = _new_figure(len(images), 1 + 3 * len(layer_ids))
    for i in range(len(images)):
        _show_input(axes[i, 0], images[i], query, gh, gw)
        axes[i, 0].set_ylabel(f"image {i}", fontsize=7)
        for j, maps in enumerate((full, linformer, sparse)):
            for c, li in enumerate(layer_ids):
                ax = axes[i, 1 + j * len(layer_ids) + c]
                _heat(ax, _grid(maps[li][i, :, query + 1].mean(0), gh, gw), query, gw)
                if i == 0:
                    ax.set_title(f"{labels[j]}\nlayer {li}", fontsize=7)
    axes[0, 0].set_title("(a) query", fontsize=7)
    _title(fig, title)
    return _save(fig, out_dir, "figure5_lowrank_vs_sparse")


def _figure6(module: Any, grid: tuple[int, int], out_dir: Path, label: str) -> tuple[list[Path], float]:
    gh, gw = grid
    preds = [b.attn.predictor for b in module.model.blocks][:6]
    n_dims = min(24, preds[0].n_down)
    fig, axes = _new_figure(len(preds), n_dims, w=0.75, h=0.8)
    zero = []
    for li, pred in enumerate(preds):
        with torch.no_grad():
            w_up = pred.sparse_w_up()[0]  # [n_down, N] (head 0 when not shared)
        zero.append(float((w_up == 0).float().mean()))
        for j in range(n_dims):
            axes[li, j].imshow(w_up[j, 1:].reshape(gh, gw).float().numpy(), cmap="viridis", interpolation="nearest")
            if li == 0:
                axes[li, j].set_title(str(j), fontsize=6)
        axes[li, 0].set_ylabel(f"layer {li}", fontsize=7)
    _title(fig, f"Figure 6 (suite): sparse basis W_up, first {len(preds)} layers, {n_dims} basis vectors; {label}")
    return _save(fig, out_dir, "figure6_w_up"), float(np.mean(zero))


def _figure7(module: Any, images: torch.Tensor, out_dir: Path, label: str) -> tuple[list[Path], int, float]:
    coefs = predictor_coefficients(module, images[:1])
    head = min(4, coefs[0].shape[1] - 1)
    cols = min(6, len(coefs))
    rows = -(-len(coefs) // cols)
    fig, axes = _new_figure(rows, cols, w=1.3, h=2.0)
    for li, c in enumerate(coefs):
        ax = axes[li // cols, li % cols]
        ax.imshow(c[0, head].float().numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {li}", fontsize=7)
    for k in range(len(coefs), rows * cols):
        axes[k // cols, k % cols].set_visible(False)
    zero = float(np.mean([float((c[0, head] == 0).float().mean()) for c in coefs]))
    _title(fig, f"Figure 7 (suite): sparse basis coefficients of head {head} (rows: query tokens, columns: basis "
                f"vectors); {label}")
    return _save(fig, out_dir, "figure7_coefficients"), head, zero


def attention_figures(output: str | Path, profile: str, dataset: str, data_dir: str | None,
                      out_dir: str | Path, log: Callable[[str], None] = print) -> list[FigureResult]:
    """Figures 3, 5, 6 and 7 from trained checkpoints in the store (see the module docstring).

    Raises:
        UserError: for a checkpoint that does not load, or test images that cannot be read.
    """
    out_dir = Path(out_dir)
    prof = get_profile(profile)
    run = f"--profile {profile} --data {dataset}" + (f" --data-dir {data_dir}" if data_dir else "") + \
        f" --output {output}"
    names = {3: ("figure3_sparsifiner", "Figure 3 (suite): connectivity mask, sparse and full attention"),
             5: ("figure5_lowrank_vs_sparse", "Figure 5 (suite): full, low-rank (Linformer) and sparse attention"),
             6: ("figure6_w_up", "Figure 6 (suite): the sparse basis W_up"),
             7: ("figure7_coefficients", "Figure 7 (suite): the sparse basis coefficients")}
    sp = _pick(find_checkpoints(output, "sparsifiner", profile, dataset), PREFERRED_KEEP)
    if sp is None:
        why = (f"no trained sparsifiner checkpoint for profile {profile} / dataset {dataset} in {output}; train "
               f"one with `python -m bench_suite run --methods sparsifiner --keep-rates 0.25 {run}`")
        return [FigureResult(n, t, missing=why) for n, t in names.values()]
    keep, key, path = sp
    log(f"  figures from {path}")
    module = load_trained("sparsifiner", path, profile)
    dm = create_datamodule(dataset, data_dir=data_dir, img_size=prof.img_size, in_chans=prof.in_chans, batch_size=2,
                           num_workers=0)
    images, labels = dm.sample_batch(2, "test")
    gh, gw = module.model.patch_embed.grid_size
    query = (gh // 2) * gw + gw // 2
    label = f"sparsifiner keep {keep:g} ({key}), {profile} / {dataset}, centre query patch {query}"
    layers = module.attention_maps(images)
    results = [FigureResult(*names[3], caption=(
        f"Trained Sparsifiner ({label}); two test images (labels {', '.join(str(int(v)) for v in labels)}); per "
        f"layer and head (up to 4): (b) the connectivity mask of the query row, (c) the sparse attention "
        f"(softmax over the B kept keys), (d) the full attention of the same q, k. The CLS key is not drawn."),
        paths=_figure3(layers, images, query, (gh, gw), out_dir, label))]
    sparse = [layer["sparse"] for layer in layers]
    fl = find_checkpoints(output, "full", profile, dataset)
    if fl:
        full = [layer["full"] for layer in load_trained("full", fl[0][2], profile).attention_maps(images)]
        full_label, full_src = "(b) full", f"the trained full-attention model ({fl[0][1]})"
    else:
        full = [layer["full"] for layer in layers]
        full_label, full_src = "(b) full (Sparsifiner q,k)", "the Sparsifiner's own dense softmax(q k^T)"
    li = _pick(find_checkpoints(output, "linformer", profile, dataset), (keep, *PREFERRED_KEEP))
    if li is None:
        results.append(FigureResult(*names[5], missing=(
            f"no trained linformer checkpoint for profile {profile} / dataset {dataset}; train one with "
            f"`python -m bench_suite run --methods linformer --keep-rates {keep:g} {run}`")))
    else:
        lin = load_trained("linformer", li[2], profile)
        lowrank = [layer["lowrank"] for layer in lin.attention_maps(images)]
        paths = _figure5(images, query, (gh, gw), full, lowrank, sparse, out_dir,
                         (full_label, "(c) Linformer P F", "(d) Sparsifiner sparse"),
                         f"Figure 5 (suite): query patch {query}, head-averaged, {profile} / {dataset}")
        results.append(FigureResult(*names[5], caption=(
            f"Head-averaged attention of the centre query patch: (b) {full_src}; (c) trained Linformer keep "
            f"{li[0]:g} (k = {lin.model.linformer_k}, {li[1]}), its attention over the tokens P F (can be "
            f"negative); (d) trained Sparsifiner keep {keep:g} ({key}), sparse attention."), paths=paths))

    paths6, w_zero = _figure6(module, (gh, gw), out_dir, label)
    results.append(FigureResult(*names[6], caption=(
        f"Rows: layers; columns: basis vectors (rows of W_up over the patch grid, CLS column not drawn), as the "
        f"model uses them (entries below the threshold are zero); measured: {100 * w_zero:.0f}% of these W_up "
        f"entries are zero (paper: about 90% after training). {label}."), paths=paths6))
    paths7, head, c_zero = _figure7(module, images, out_dir, label)
    results.append(FigureResult(*names[7], caption=(
        f"Sparse basis coefficients A~_down (eq. 2) of head {head} in every layer for test image 0 (rows: query "
        f"tokens without CLS, columns: basis vectors); measured: {100 * c_zero:.0f}% of them are zero (paper: "
        f"about 87%). {label}."), paths=paths7))
    return results


def make_figures(output: str | Path, paper_results: pd.DataFrame, profile: str, dataset: str,
                 data_dir: str | None, out_dir: str | Path, log: Callable[[str], None] = print) -> list[FigureResult]:
    """All figures of the tables page (Figure 4 twice, Figures 3, 5, 6, 7); see the module docstring."""
    log("bench_suite tables: figures")
    figs = [figure4_paper(paper_results, out_dir), figure4_suite(output, profile, dataset, out_dir)]
    figs += attention_figures(output, profile, dataset, data_dir, out_dir, log=log)
    for f in figs:
        log(f"  {f.name}: " + (", ".join(str(p) for p in f.paths) if f.paths else f"not drawn ({f.missing})"))
    return figs
