"""Visual check of Sparsifiner's attention (the paper's Figure 3): ``python -m bench_suite visualize``.

For a few real test images and one query patch, every layer and head of a trained model shows the
heatmaps over the patch grid that its method gives (:meth:`methods.base.BenchModule.attention_maps`). For
Sparsifiner (or Sparsif-EViT), the paper's Figure 3:

* the connectivity mask ``M`` of the query row (paper eq. 3; the ``B`` keys the query may attend to),
* the sparse attention (eq. 4: the softmax over the kept keys only),
* the full attention ``softmax(q k^T / sqrt(d))`` of the same layer and head (what sparse attention
  approximates).

Every other method shows at least its dense attention (Linformer also its low-rank attention ``P F``).

The CLS key is not drawn (the grid holds the patch tokens). In Sparsif-EViT's pruned layers, the keys
that EViT removed (or fused into its extra token) are blank, and a query patch that was removed shows
an empty row. Figures go to ``<output>/figures/`` as PNG, one per image.

The module is loaded from ``--checkpoint`` or, by default, from the runner's checkpoint of the matching
configuration (``<output>/runs/<key>/checkpoints/last.ckpt``, found through the results store).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench_suite.backbones import get_profile
from bench_suite.checkpoints import find_checkpoints, load_trained
from bench_suite.errors import UserError
from bench_suite.plan import check_output
from bench_suite.registry import get_method
from datamodules import create_datamodule

__all__ = ["FIGURE3_METHOD", "map_names", "query_maps", "class_label", "maps_figure", "plot_maps", "visualize"]



FIGURE3_METHOD = "sparsifiner"
"""The method of the paper's Figure 3, the default of ``visualize --method``."""
META_KEYS = ("positions", "n", "budget")
"""Entries of a layer of :meth:`methods.base.BenchModule.attention_maps` that are not maps."""


def map_names(layer: dict[str, Any]) -> list[str]:
    """The names of one layer's attention maps, in the order the method gives them."""
    return [k for k in layer if k not in META_KEYS]


def query_maps(layer: dict[str, Any], image: int, query_token: int, n_patches: int) -> dict[str, torch.Tensor] | None:
    """One layer's maps ``[H, n_patches]`` of the query token (original index, CLS = 0) of one image,
    in original patch order (NaN where a key token does not exist in this layer); ``None`` if the
    query token was pruned in this layer."""
    pos = layer["positions"]
    n = layer["n"]
    if pos is None and n != n_patches + 1:  # tokens were removed and the method does not say which: no map
        return None
    if pos is None:
        row, key_pos = query_token, torch.arange(n)
    else:
        p = pos[image]  # [N_l, N0]
        one_hot = p.amax(-1) >= 1.0 - 1e-6
        src = p.argmax(-1)
        hits = ((src == query_token) & one_hot).nonzero()
        if len(hits) == 0:
            return None
        row = int(hits[0, 0])
        key_pos = torch.where(one_hot, src, torch.full_like(src, -1))
    maps = {}
    for name in map_names(layer):
        vec = layer[name][image, :, row].float()  # [H, N_l]
        grid = torch.full((vec.shape[0], n_patches), float("nan"))
        keep = key_pos >= 1  # patch keys with one original position
        grid[:, key_pos[keep] - 1] = vec[:, keep]
        maps[name] = grid
    return maps


def class_label(label: int, class_names: tuple[str, ...]) -> str:
    """The class's name where the dataset declares names (``Ankle boot``), else ``label 9``."""
    return class_names[label] if 0 <= label < len(class_names) else f"label {label}"


def plot_maps(image: torch.Tensor, layers: list[dict[str, Any]], image_index: int, query: int,
              grid: tuple[int, int], path: Path, title: str) -> Path:
    """Save :func:`maps_figure` as PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    maps_figure(image, layers, image_index, query, grid, title).savefig(path, dpi=80)
    return path


def maps_figure(image: torch.Tensor, layers: list[dict[str, Any]], image_index: int, query: int,
                grid: tuple[int, int], title: str) -> Any:
    """One image's figure (a matplotlib ``Figure``): the input with the query patch, then per layer (rows)
    and head every map of the query (columns: e.g. connectivity mask, sparse and full attention). A mask is
    drawn black (kept) on white; the attention maps of a row share one colour scale, shown by the row's
    colour bar (probability; Linformer's ``P F`` can be negative)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    gh, gw = grid
    names = map_names(layers[0])
    heads, per = layers[0][names[0]].shape[1], len(names)
    n_layers = len(layers)
    fig = Figure(figsize=(1.25 * (1 + per * heads) + 0.8, 1.3 * n_layers + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_layers, 1 + per * heads, squeeze=False)
    img = image.float().mean(0)
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    ph, pw = img.shape[0] / gh, img.shape[1] / gw
    qy, qx = divmod(query, gw)
    for li, layer in enumerate(layers):
        ax = axes[li, 0]
        ax.imshow(img, cmap="gray")
        ax.add_patch(Rectangle((qx * pw - 0.5, qy * ph - 0.5), pw, ph, fill=False, edgecolor="yellow", linewidth=1.5))
        budget = f"B={layer['budget']}/{layer['n']}" if "budget" in layer else f"N={layer['n']}"
        ax.set_ylabel(f"layer {li}\n{budget}", fontsize=7)
        maps = query_maps(layer, image_index, query + 1, gh * gw)
        values = [maps[n].numpy() for n in names if n != "mask"] if maps is not None else []
        finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(1)
        vmin, vmax = min(0.0, float(finite.min(initial=0.0))), max(float(finite.max(initial=0.0)), 1e-6)
        shown = None
        for h in range(heads):
            for j, name in enumerate(names):
                ax = axes[li, 1 + per * h + j]
                if maps is None:
                    why = "query\npruned" if layer["positions"] is not None else "tokens\nrearranged"
                    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=6, transform=ax.transAxes)
                elif name == "mask":
                    ax.imshow(maps[name][h].reshape(gh, gw).numpy(), cmap="Greys", vmin=0, vmax=1,
                              interpolation="nearest")
                else:
                    shown = ax.imshow(maps[name][h].reshape(gh, gw).numpy(), cmap="viridis", vmin=vmin, vmax=vmax,
                                      interpolation="nearest")
                if maps is not None:
                    ax.add_patch(Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, edgecolor="yellow", linewidth=1))
                if li == 0:
                    ax.set_title(f"h{h} {name}", fontsize=7)
        if shown is not None:
            bar = fig.colorbar(shown, ax=list(axes[li, 1:]), fraction=0.02, pad=0.01)
            bar.ax.tick_params(labelsize=5)
            bar.set_label("attention", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


def visualize(method: str = FIGURE3_METHOD, keep_rate: float = 0.25, output: str | Path = "results",
              checkpoint: str | Path | None = None, images: int = 4, query: int | None = None,
              profile: str = "mini", data: str = "fashion_mnist", data_dir: str | None = None) -> list[Path]:
    """Write Figure-3-style PNGs of ``images`` test images to ``<output>/figures/``.

    Args:
        method: a registered method (its :meth:`~methods.base.BenchModule.attention_maps` are drawn).
        keep_rate: keep rate of the configuration (checked against the checkpoint).
        output: results folder (figures are written to its ``figures`` subfolder).
        checkpoint: Lightning checkpoint; default: the runner's checkpoint of this configuration.
        images: number of test images (the first ones of the test split).
        query: query patch, 0-based row-major index over the patch grid (default: the centre patch).
        profile, data, data_dir: backbone profile and dataset.

    Returns:
        Paths of the written PNGs.

    Raises:
        UserError: for a missing checkpoint, a keep rate or query out of range, or data not found.
    """
    get_method(method)  # UnknownMethodError first, naming the known methods
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    prof = get_profile(profile)
    if checkpoint is None:
        found = find_checkpoints(output, method, profile, data, keep_rate=keep_rate)
        if not found:
            raise UserError(f"no trained checkpoint of {method} at keep rate {keep_rate:g} ({profile}, {data}) under "
                            f"{output}; train it with 'python -m bench_suite run' or pass --checkpoint PATH")
        path = found[0][2]
    else:
        path = Path(checkpoint)
    module = load_trained(method, path, profile)
    if abs(module.keep_rate - float(keep_rate)) > 1e-9:
        raise UserError(f"checkpoint {path} has keep rate {module.keep_rate:g}, not {keep_rate:g}")
    gh, gw = module.model.patch_embed.grid_size
    n_patches = gh * gw
    query = _grid_centre(gh, gw) if query is None else int(query)
    if not 0 <= query < n_patches:
        raise UserError(f"--query must be a patch index in [0, {n_patches}) for the {gh}x{gw} grid, got {query}")
    out_dir = Path(output) / "figures"
    check_output(out_dir)
    dm = create_datamodule(data, data_dir=data_dir, img_size=prof.img_size, in_chans=prof.in_chans, batch_size=images)
    x, y = dm.sample_batch(images, split="test")
    layers = module.attention_maps(x)
    class_names = tuple(getattr(dm, "class_names", ()) or ())
    out_dir = Path(output) / "figures"
    written = []
    for i in range(len(x)):
        name = f"visualize_{method}_keep{keep_rate:g}_img{i}_q{query}.png"
        label = class_label(int(y[i]), class_names)
        title = (f"{method}, keep rate {keep_rate:g}, test image {i} ({label}), query patch "
                 f"{query}: {' | '.join(map_names(layers[0]))} per head")
        written.append(plot_maps(x[i], layers, i, query, (gh, gw), out_dir / name, title))
    return written


def _grid_centre(gh: int, gw: int) -> int:
    return (gh // 2) * gw + gw // 2

