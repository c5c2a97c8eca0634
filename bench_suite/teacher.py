"""The full-attention teacher: trained once per backbone/dataset/seed, cached by a hash of its config.

As in the paper, which fine-tunes every method from a pretrained ViT, the teacher is both the
distillation target and the initialisation of every method. Where the teacher comes from, in order:

1. ``--teacher PATH``: a checkpoint the user names (a Lightning checkpoint of the ``full`` method, the
   slim export this module writes, or a timm-format ``.safetensors`` / ``.pth`` / ``.bin`` state dict, loaded
   through timm's ``load_state_dict`` and ``checkpoint_filter_fn``, which resizes the position embedding,
   e.g. DeiT-T's 224 weights for the 384 profile); or ``--teacher timm:<name>[.<tag>]``, timm's own
   pretrained weights (``timm.create_model(..., pretrained=True)``, from the Hugging Face hub or its local
   cache). A classifier of another number of classes is replaced by a fresh one (said in the provenance);
2. the cache ``<output>/teachers/<profile>-<dataset>-seed<seed>-<key>/teacher.ckpt``;
3. a teacher shipped inside the package (``bench_suite/assets/teachers/``) whose manifest has the
   same config key;
4. training it now (``python -m bench_suite teacher`` does only this step).

Its top-1 accuracy is re-measured on every run; a manifest's number is never reported.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_suite.backbones import STATE_ADAPTERS, create_backbone, get_profile
from bench_suite.errors import TeacherError
from bench_suite.locks import ConfigLock

__all__ = ["TeacherError", "TeacherRecipe", "TEACHER_RECIPES", "teacher_key", "load_teacher_checkpoint",
           "load_timm_teacher", "is_suite_checkpoint", "TIMM_PREFIX",
           "export_checkpoint", "shipped_teachers", "ASSETS_DIR", "file_sha256"]

ASSETS_DIR = Path(__file__).parent / "assets" / "teachers"
FORMAT = "bench_suite.teacher/1"


@dataclass(frozen=True)
class TeacherRecipe:
    """How the full-attention teacher is trained from scratch (all settings enter the cache key).

    Attributes:
        epochs: passes over the training split.
        lr: peak AdamW learning rate (cosine schedule, linear warm-up).
        weight_decay: AdamW weight decay.
        warmup_frac: fraction of steps of linear warm-up.
        label_smoothing: cross-entropy label smoothing.
        batch_size: images per batch.
        drop_path_rate: stochastic depth of the backbone while training the teacher.
    """

    epochs: int = 12
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    label_smoothing: float = 0.1
    batch_size: int = 128
    drop_path_rate: float = 0.05


TEACHER_RECIPES: dict[str, TeacherRecipe] = {
    "mini": TeacherRecipe(),
    # 197 tokens cost about 4x mini's step: a 6-epoch schedule (about 75 min on 2 cores) instead of 12
    "mini197": TeacherRecipe(epochs=6),
    "tiny": TeacherRecipe(epochs=1, lr=2e-3, drop_path_rate=0.0),
}


def teacher_key(profile: str, data: dict[str, Any], seed: int, recipe: TeacherRecipe) -> str:
    """12-hex-digit hash of everything that defines a teacher (profile, data split, seed, recipe)."""
    data = {k: v for k, v in data.items() if k not in ("batch_size", "data_dir")}
    blob = json.dumps({"profile": profile, "data": data, "seed": seed, "recipe": asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise TeacherError(f"teacher {path} is a folder; --teacher takes a checkpoint file (a teacher.ckpt)")
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means unreadable
        raise TeacherError(f"teacher checkpoint {path} is unreadable: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise TeacherError(f"{path} is not a bench_suite/Lightning checkpoint (no 'state_dict')")
    return ckpt


TIMM_PREFIX = "timm:"


def _fit_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, profile: str) -> str | None:
    """Load a timm-format ``state`` into ``model`` (position embedding resized by timm's
    ``checkpoint_filter_fn``); a classifier for another number of classes is left out (the model keeps its
    fresh one). Returns the note on the classifier (or None).

    Raises:
        TeacherError: naming the first weight that is missing, unexpected or of the wrong shape.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(dict(state), model)
    except Exception as e:  # noqa: BLE001 - timm's filter fails on foreign files in many ways
        raise TeacherError(f"teacher {source} is not a timm ViT state dict for profile {profile!r}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    note = None
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and "head.weight" in state and state["head.weight"].shape != head.weight.shape:
        note = (f"classifier replaced: the weights have {state['head.weight'].shape[0]} classes, the data "
                f"{head.weight.shape[0]} (a fresh head, trained by nothing: fine-tune the teacher first)")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    for name, value in state.items():
        if name in own and tuple(own[name].shape) != tuple(value.shape):
            raise TeacherError(f"teacher {source} does not fit profile {profile!r}: {name} has shape "
                               f"{tuple(value.shape)}, expected {tuple(own[name].shape)}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (note and k.startswith("head."))]
    if missing or result.unexpected_keys:
        first = (missing + result.unexpected_keys)[0]
        kind = "missing" if missing else "unexpected"
        raise TeacherError(f"teacher {source} does not fit profile {profile!r}: {kind} weight {first!r}")
    return note


def load_timm_teacher(spec: str, profile: str, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """A teacher from timm: ``timm:<name>[.<tag>]`` (pretrained weights through timm) or a timm-format file.

    Returns ``(model, provenance)``; ``provenance`` holds ``timm`` (name and tag) or ``file`` and ``sha256``,
    and ``classifier`` when the head was replaced.

    Raises:
        TeacherError: for an architecture other than the profile's, weights that cannot be fetched (offline:
            download them where there is network, or pass the file), or weights that do not fit.
    """
    import timm

    p = get_profile(profile)
    model = create_backbone(p, num_classes=num_classes)
    if spec.startswith(TIMM_PREFIX):
        name = spec[len(TIMM_PREFIX):].strip()
        arch = name.split(".", 1)[0]
        if arch != p.model:
            raise TeacherError(f"teacher {spec}: architecture {arch!r} is not profile {profile!r}'s ({p.model!r})")
        try:
            pretrained = timm.create_model(name, pretrained=True, num_classes=1000, img_size=p.img_size,
                                           in_chans=p.in_chans)
        except Exception as e:  # noqa: BLE001 - hub, network and cache failures all mean "not available here"
            raise TeacherError(f"teacher {spec}: timm could not load its pretrained weights "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                               f"fetch them where there is network or pass the weights file") from None
        note = _fit_state(model, pretrained.state_dict(), spec, profile)
        provenance: dict[str, Any] = {"timm": name}
    else:
        from timm.models import load_state_dict

        path = Path(spec)
        if not path.is_file():
            raise TeacherError(f"teacher checkpoint {path} does not exist")
        try:
            state = load_state_dict(str(path))
        except Exception as e:  # noqa: BLE001 - unreadable in any way
            raise TeacherError(f"teacher {path} is unreadable: {type(e).__name__}") from None
        adapter = STATE_ADAPTERS.get(p.model)
        if adapter is not None:  # e.g. the official LV-ViT-S release's key names
            state = adapter(state)
        note = _fit_state(model, state, str(path), profile)
        provenance = {"file": str(path), "sha256": file_sha256(path)}
    if note:
        provenance["classifier"] = note
    model.bench_suite_profile = p.name
    return model.eval(), provenance


def load_teacher_checkpoint(path: str | Path, profile: str, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Build the profile's backbone and load the teacher weights from ``path``.

    Accepts a Lightning checkpoint of the ``full`` method (keys ``model.*``) or the slim export of
    :func:`export_checkpoint`.

    Returns:
        ``(model, meta)``: the backbone in eval mode and the checkpoint's ``bench_suite`` metadata.

    Raises:
        TeacherError: if the file is missing or unreadable, was made for another profile or number of
            classes, or its weights do not fit the backbone.
    """
    path = Path(path)
    ckpt = _read_checkpoint(path)
    meta = dict(ckpt.get("bench_suite", {}))
    if meta.get("profile") not in (None, profile):
        raise TeacherError(f"teacher {path} was trained for profile {meta['profile']!r}, not {profile!r}")
    if meta.get("num_classes") not in (None, num_classes):
        raise TeacherError(f"teacher {path} has {meta['num_classes']} classes, the data has {num_classes}")
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise TeacherError(f"{path} holds no backbone weights (no 'model.*' keys)")
    model = create_backbone(get_profile(profile), num_classes=num_classes)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        some = (result.missing_keys + result.unexpected_keys)[:3]
        raise TeacherError(f"teacher {path} does not fit profile {profile!r}: mismatched weights {some}")
    for name, p in model.state_dict().items():
        if p.shape != state[name].shape:
            raise TeacherError(f"teacher {path} does not fit profile {profile!r}: {name} has shape "
                               f"{tuple(state[name].shape)}, expected {tuple(p.shape)}")
    return model.eval(), meta


def export_checkpoint(lightning_ckpt: str | Path, out: str | Path, meta: dict[str, Any]) -> Path:
    """Write the slim teacher checkpoint (backbone weights + hyperparameters + ``meta``), without the
    optimizer state, so that it can be shipped or cached."""
    ckpt = _read_checkpoint(Path(lightning_ckpt))
    slim = {
        "format": FORMAT,
        "state_dict": {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")},
        "hyper_parameters": dict(ckpt.get("hyper_parameters", {})),
        "bench_suite": meta,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(slim, tmp)
    tmp.replace(out)
    return out


def shipped_teachers() -> list[dict[str, Any]]:
    """Manifests of the teachers shipped in the package, each with its ``path``."""
    out = []
    for manifest in sorted(ASSETS_DIR.glob("*/manifest.json")):
        info = json.loads(manifest.read_text())
        info["path"] = str(manifest.parent / info.get("file", "teacher.ckpt"))
        out.append(info)
    return out


def find_shipped(key: str) -> Path | None:
    """Path of a shipped teacher whose manifest has config key ``key`` and whose sha256 matches."""
    for info in shipped_teachers():
        p = Path(info["path"])
        if info.get("key") == key and p.is_file() and file_sha256(p) == info.get("sha256"):
            return p
    return None


def install_shipped(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def teacher_dir(output: str | Path, profile: str, dataset: str, seed: int, key: str) -> Path:
    """Cache folder of one teacher under the output folder."""
    return Path(output) / "teachers" / f"{profile}-{dataset}-seed{seed}-{key}"


def train_teacher(profile: str, datamodule, seed: int, output: str | Path, settings,
                  recipe: TeacherRecipe | None = None, command: str = "") -> Path:
    """Train the full-attention teacher from scratch (resumable), write its slim checkpoint and a
    manifest (command, seed, data, measured top-1, sha256, wall time) into the cache folder.

    Args:
        profile: backbone profile name.
        datamodule: the dataset's LightningDataModule (its ``describe()`` enters the key).
        seed: global seed (``pytorch_lightning.seed_everything``).
        output: results folder; the teacher goes to ``<output>/teachers/...``.
        settings: :class:`bench_suite.training.TrainSettings` (its ``epochs`` is replaced by the recipe's).
        recipe: training recipe; defaults to ``TEACHER_RECIPES[profile]``.
        command: the command line to record in the manifest.

    Returns:
        Path of the slim ``teacher.ckpt``.
    """
    import time

    import pytorch_lightning as pl

    from bench_suite.registry import reference_method
    from bench_suite.training import fit_and_test
    from bench_suite.versions import versions

    recipe = recipe or TEACHER_RECIPES.get(profile, TeacherRecipe())
    datamodule.batch_size = recipe.batch_size
    data = datamodule.describe()
    key = teacher_key(profile, data, seed, recipe)
    folder = teacher_dir(output, profile, data["dataset"], seed, key)
    folder.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule.setup()
    backbone = create_backbone(profile, num_classes=datamodule.num_classes, drop_path_rate=recipe.drop_path_rate)
    module = reference_method().factory(backbone, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                        warmup_frac=recipe.warmup_frac, label_smoothing=recipe.label_smoothing,
                                        distill_logits=0.0, lr_batch=None)  # the recipe's lr is the peak
    start = time.perf_counter()
    metrics = fit_and_test(module, datamodule, folder / "run", replace(settings, epochs=recipe.epochs))
    seconds = time.perf_counter() - start
    meta = {"profile": profile, "num_classes": datamodule.num_classes, "key": key, "seed": seed, "data": data,
            "recipe": asdict(recipe)}
    out = export_checkpoint(folder / "run" / "checkpoints" / "last.ckpt", folder / "teacher.ckpt", meta)
    manifest = {**meta, "file": "teacher.ckpt", "sha256": file_sha256(out), "command": command,
                "test_top1_at_creation": metrics.get("test/top1"), "val_top1_at_creation": metrics.get("val/top1"),
                "train_seconds": round(seconds, 1), "versions": versions(),
                "note": "top-1 here is a record of creation only; every run re-measures the teacher"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def _full_training_split(datamodule):
    """The teacher always trains on the whole training split: a copy of ``datamodule`` without the
    run's training subset (the validation split and test set are the same)."""
    if getattr(datamodule, "train_subset", None) is None:
        return datamodule
    dm = copy.copy(datamodule)
    dm.train_subset = None
    dm.reset()
    return dm


def resolve_teacher(profile: str, datamodule, seed: int, output: str | Path, settings,
                    teacher_path: str | Path | None = None, train_if_missing: bool = True,
                    log=print) -> tuple[nn.Module, dict[str, Any]]:
    """Find or make the teacher (see the module docstring for the order) and load it.

    Returns:
        ``(model, info)`` with ``info = {"path", "source", "key", "sha256"}``.

    Raises:
        TeacherError: if a given checkpoint is unreadable or mismatched, or no teacher exists and
            ``train_if_missing`` is false.
    """
    recipe = TEACHER_RECIPES.get(profile, TeacherRecipe())
    datamodule = _full_training_split(datamodule)
    data = {**datamodule.describe(), "batch_size": recipe.batch_size}
    key = teacher_key(profile, data, seed, recipe)
    if teacher_path is not None:
        path, source = Path(teacher_path), "given"
    else:
        folder = teacher_dir(output, profile, data["dataset"], seed, key)
        path, source = folder / "teacher.ckpt", "cache"
        if not path.is_file():
            shipped = find_shipped(key)
            if shipped is not None:
                install_shipped(shipped, path)
                manifest = shipped.parent / "manifest.json"
                if manifest.is_file():
                    shutil.copyfile(manifest, folder / "manifest.json")
                source = "shipped"
            elif train_if_missing:
                log(f"no cached teacher for {profile}/{data['dataset']}/seed {seed} (key {key}): training it now")
                train_teacher(profile, datamodule, seed, output, settings, recipe,
                              command=f"python -m bench_suite teacher --profile {profile} --seed {seed}")
                source = "trained"
            else:
                raise TeacherError(f"no teacher for {profile}/{data['dataset']}/seed {seed} (key {key}); "
                                   f"run 'python -m bench_suite teacher --profile {profile} --seed {seed}'")
    model, meta = load_teacher_checkpoint(path, profile, datamodule.num_classes)
    return model, {"path": str(path), "source": source, "key": meta.get("key", key), "sha256": file_sha256(path)}


def load_given_teacher(path: str | Path, profile: str, dm, seed: int, output: str | Path, settings,
                       log=print) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``--teacher PATH`` for a run on ``dm`` (nothing is written).

    Raises:
        TeacherError: if it is missing, unreadable or does not fit the profile (a weight-shape mismatch
            that torch reports as a ``RuntimeError`` becomes a one-line TeacherError too).
    """
    spec = str(path)
    if spec.startswith(TIMM_PREFIX) or not is_suite_checkpoint(spec):
        model, provenance = load_timm_teacher(spec, profile, dm.num_classes)
        ident = file_sha256(spec) if "sha256" in provenance else hashlib.sha256(spec.encode()).hexdigest()
        if "classifier" in provenance:
            log(f"teacher {spec}: {provenance['classifier']}")
        return model, {"path": spec, "source": "timm" if "timm" in provenance else "file", "key": None,
                       "sha256": ident, "provenance": provenance}
    try:
        return resolve_teacher(profile, teacher_datamodule(dm), seed, output, settings, teacher_path=path, log=log)
    except TeacherError:
        raise
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing key" in ln]
        if not lines:
            raise
        raise TeacherError(f"teacher {path} does not fit profile {profile!r}: {lines[0]}") from None


SUITE_SUFFIXES = (".ckpt",)  # Lightning / suite checkpoints; .safetensors, .pth, .bin, .pt: timm format unless
# they hold a Lightning "state_dict" with "model.*" keys


def is_suite_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a suite/Lightning checkpoint (``state_dict`` with ``model.*`` keys) rather than a
    timm-format state dict. A missing or unreadable file counts as a suite checkpoint (its loader says why)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return False
    if path.suffix in SUITE_SUFFIXES or not path.is_file():
        return True
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - let the suite's loader report it
        return True
    return isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and \
        any(str(k).startswith("model.") for k in ckpt["state_dict"])


def teacher_datamodule(dm):
    """The run's datamodule as the teacher sees it: its own copy (the teacher sets its recipe's batch
    size on it), always with augmentation (part of the teacher's recipe, whatever ``--no-augment`` says)."""
    tdm = copy.copy(dm)
    if getattr(tdm, "augment", True) is not True:
        tdm.augment = True
        tdm.reset()
    return tdm


def resolve_teacher_locked(profile: str, dm, seed: int, output: str | Path, settings, external: bool,
                           log=print) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher from the cache or the shipped teachers, else trained now in this one process, while
    holding the teacher's lock (a second sweep waits for it instead of training it too); ``external``: the
    processes were started by someone else, so a missing teacher is an error rather than trained here."""
    lock = ConfigLock(Path(output) / "locks" / f"teacher-{profile}-{dm.name}-seed{seed}.lock")
    if not lock.try_acquire():
        log(f"waiting for another process that is making the teacher ({lock.holder()})")
        lock.acquire()
    try:
        one = replace(settings, devices=1, num_nodes=1, strategy="auto")  # the teacher is trained in one process
        return resolve_teacher(profile, teacher_datamodule(dm), seed, output, one, train_if_missing=not external,
                               log=log)
    finally:
        lock.release()
