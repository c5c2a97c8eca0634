"""Visual check of Sparsifiner's attention (the paper's Figure 3): ``python -m bench_suite visualize``.

For a few real test images and one query patch, every layer and head of a trained Sparsifiner (or
Sparsif-EViT) shows three heatmaps over the patch grid:

* the connectivity mask ``M`` of the query row (paper eq. 3; the ``B`` keys the query may attend to),
* the sparse attention (eq. 4: the softmax over the kept keys only),
* the full attention ``softmax(q k^T / sqrt(d))`` of the same layer and head (what sparse attention
  approximates).

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

from bench_suite.errors import UserError

__all__ = ["find_checkpoint", "load_module", "collect_maps", "query_maps", "plot_maps", "visualize"]



def find_checkpoint(output: str | Path, method: str, keep_rate: float, profile: str,
                    dataset: str = "fashion_mnist") -> Path:
    """The runner's final checkpoint of ``(method, keep_rate, profile, dataset)``: the store row's key ->
    ``<output>/runs/<key>/checkpoints/last.ckpt`` (the newest such row with an existing file).

    Raises:
        UserError: if there is no store or no trained configuration with a checkpoint.
    """
    from bench_suite.store import STORE_FILENAME, ResultsStore

    output = Path(output)
    store_path = output / STORE_FILENAME
    hint = "train it with 'python -m bench_suite run' or pass --checkpoint PATH"
    if not store_path.is_file():
        raise UserError(f"no results store at {store_path}; {hint}")
    with ResultsStore(store_path) as store:
        rows = store.rows(method=method, profile=profile, dataset=dataset)
    if len(rows):
        rows = rows[(rows["keep_rate"] - float(keep_rate)).abs() < 1e-9]
        if "created" in rows:
            rows = rows.sort_values("created", ascending=False)
        for key in rows["key"]:
            path = output / "runs" / str(key) / "checkpoints" / "last.ckpt"
            if path.is_file():
                return path
    raise UserError(f"no trained checkpoint of {method} at keep rate {keep_rate:g} ({profile}, {dataset}) "
                      f"under {output}; {hint}")


def load_module(method: str, checkpoint: str | Path, profile: str, num_classes: int = 10) -> Any:
    """Load a method's LightningModule from a Lightning checkpoint onto a fresh backbone of ``profile``
    (``spec.factory.load_from_checkpoint(path, backbone=..., teacher=None, map_location="cpu")``).

    Raises:
        UserError: for a missing file, a method without Sparsifiner attention, or a checkpoint that
            does not fit the profile's backbone.
    """
    from bench_suite.backbones import create_backbone
    from bench_suite.registry import get_method
    from methods.sparsifiner import SparsifinerAttention

    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    spec = get_method(method)
    try:  # checkpoints hold the student only (BenchModule.on_save_checkpoint); loading is strict
        module = spec.factory.load_from_checkpoint(str(path), backbone=create_backbone(profile, num_classes=num_classes),
                                                   teacher=None, map_location="cpu")
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"cannot load {path} as {method} on the {profile} profile: "
                          f"{str(e).splitlines()[0]}") from None
    if not all(isinstance(b.attn, SparsifinerAttention) for b in module.model.blocks):
        raise UserError(f"method {method!r} has no Sparsifiner attention to visualise "
                          f"(use sparsifiner or sparsif_evit)")
    return module


@torch.no_grad()
def collect_maps(module: Any, images: torch.Tensor) -> list[dict[str, Any]]:
    """Run ``module`` in eval mode on ``images [B, C, H, W]`` and return per layer: ``mask`` (bool),
    ``sparse`` and ``full`` (``[B, H, N_l, N_l]``), ``positions`` (``[B, N_l, N0]`` or ``None``),
    ``budget`` and ``n``."""
    attns = [b.attn for b in module.model.blocks]
    was_training = module.training
    module.eval()
    try:
        for a in attns:
            a.record = True
        module(images)
    finally:
        for a in attns:
            a.record = False
        module.train(was_training)
    out = []
    for a in attns:
        rec = a.last["records"]
        out.append({"mask": rec["mask"], "sparse": rec["sparse_probs"], "full": rec["full_probs"],
                    "positions": a.last.get("positions"), "budget": a.last["budget"], "n": a.last["n"]})
    return out


def query_maps(layer: dict[str, Any], image: int, query_token: int, n_patches: int) -> dict[str, torch.Tensor] | None:
    """One layer's three maps ``[H, n_patches]`` of the query token (original index, CLS = 0) of one image,
    in original patch order (NaN where a key token does not exist in this layer); ``None`` if the
    query token was pruned in this layer."""
    pos = layer["positions"]
    n = layer["n"]
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
    for name in ("mask", "sparse", "full"):
        vec = layer[name][image, :, row].float()  # [H, N_l]
        grid = torch.full((vec.shape[0], n_patches), float("nan"))
        keep = key_pos >= 1  # patch keys with one original position
        grid[:, key_pos[keep] - 1] = vec[:, keep]
        maps[name] = grid
    return maps


def plot_maps(image: torch.Tensor, layers: list[dict[str, Any]], image_index: int, query: int,
              grid: tuple[int, int], path: Path, title: str) -> Path:
    """Draw one image's figure: the input with the query patch, then per layer (rows) and head the mask,
    sparse and full attention of the query (columns), and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    gh, gw = grid
    heads = layers[0]["mask"].shape[1]
    n_layers = len(layers)
    fig, axes = plt.subplots(n_layers, 1 + 3 * heads, figsize=(1.25 * (1 + 3 * heads), 1.3 * n_layers + 0.8),
                             squeeze=False)
    img = image.float().mean(0)
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    ph, pw = img.shape[0] / gh, img.shape[1] / gw
    qy, qx = divmod(query, gw)
    for li, layer in enumerate(layers):
        ax = axes[li, 0]
        ax.imshow(img, cmap="gray")
        ax.add_patch(Rectangle((qx * pw - 0.5, qy * ph - 0.5), pw, ph, fill=False, edgecolor="yellow", linewidth=1.5))
        ax.set_ylabel(f"layer {li}\nB={layer['budget']}/{layer['n']}", fontsize=7)
        maps = query_maps(layer, image_index, query + 1, gh * gw)
        for h in range(heads):
            for j, name in enumerate(("mask", "sparse", "full")):
                ax = axes[li, 1 + 3 * h + j]
                if maps is None:
                    ax.text(0.5, 0.5, "query\npruned", ha="center", va="center", fontsize=6, transform=ax.transAxes)
                else:
                    ax.imshow(maps[name][h].reshape(gh, gw).numpy(), cmap="viridis", interpolation="nearest")
                    ax.add_patch(Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, edgecolor="yellow", linewidth=1))
                if li == 0:
                    ax.set_title(f"h{h} {name}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def visualize(method: str = "sparsifiner", keep_rate: float = 0.25, output: str | Path = "results",
              checkpoint: str | Path | None = None, images: int = 4, query: int | None = None,
              profile: str = "mini", data: str = "fashion_mnist", data_dir: str | None = None) -> list[Path]:
    """Write Figure-3-style PNGs of ``images`` test images to ``<output>/figures/``.

    Args:
        method: ``sparsifiner`` or ``sparsif_evit``.
        keep_rate: attention keep rate of the configuration (checked against the checkpoint).
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
    from bench_suite.backbones import get_profile
    from datamodules import create_datamodule

    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    prof = get_profile(profile)
    path = Path(checkpoint) if checkpoint is not None else find_checkpoint(output, method, keep_rate, profile, data)
    module = load_module(method, path, profile)
    if abs(module.keep_rate - float(keep_rate)) > 1e-9:
        raise UserError(f"checkpoint {path} has attention keep rate {module.keep_rate:g}, not {keep_rate:g}")
    gh, gw = module.model.patch_embed.grid_size
    n_patches = gh * gw
    query = _grid_centre(gh, gw) if query is None else int(query)
    if not 0 <= query < n_patches:
        raise UserError(f"--query must be a patch index in [0, {n_patches}) for the {gh}x{gw} grid, got {query}")
    dm = create_datamodule(data, data_dir=data_dir, img_size=prof.img_size, in_chans=prof.in_chans, batch_size=images)
    x, y = dm.sample_batch(images, split="test")
    layers = collect_maps(module, x)
    out_dir = Path(output) / "figures"
    written = []
    for i in range(len(x)):
        name = f"visualize_{method}_keep{keep_rate:g}_img{i}_q{query}.png"
        title = (f"{method}, attention keep rate {keep_rate:g}, test image {i} (label {int(y[i])}), query patch "
                 f"{query}: connectivity mask | sparse attention | full attention per head")
        written.append(plot_maps(x[i], layers, i, query, (gh, gw), out_dir / name, title))
    return written


def _grid_centre(gh: int, gw: int) -> int:
    return (gh // 2) * gw + gw // 2

