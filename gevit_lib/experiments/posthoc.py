"""The post's post-hoc equivariance experiments (SPEC 5.4, 5.5, 8.1-8.4) as functions that write tables.

- :func:`rotmnist`: ViT trained on rotated MNIST, evaluated on rotated MNIST (experiment 1);
- :func:`mnist_to_rotmnist`: ViT trained on upright MNIST, evaluated on rotated MNIST (experiment 2; finetuning
  uses rotated-MNIST training images, as the original did);
- :func:`low_data`: ViT trained on 10% of rotated MNIST; finetuning on the same 10% (experiment 3);
- :func:`pcam`: a pretrained CNN (TIAToolbox weights from the Hugging Face hub through timm) on PatchCamelyon
  (experiment 4).

Each runs every method in every finetuning mode ("none", "head", "model"; see :mod:`gevit_lib.posthoc`) from the
published checkpoint (default), a checkpoint file, a model object, or a ViT trained here (``checkpoint="train"``),
at a profile's sizes (:mod:`gevit_lib.profiles`). Finetuning goes through :func:`gevit_lib.train.fit`: Adam 5e-4
(PCam: SGD 1e-3 Nesterov), random-rotation augmentation (PCam: random 90-degree rotations and flips), the best
validation epoch kept with the initial model counting as the starting best, seed 42 before each method.
Results go to ``out_dir``: ``results.csv`` (one row per mode x method, accuracies in percent, with the data
source, checkpoint, profile and seed), ``results.md`` (method x mode table) and ``meta.json``.

When the backbone stays frozen (modes "none" and "head", no BatchNorm statistics to update), the embeddings of
the transformed validation and test images are computed once per group and shared by every method; this gives
the same numbers as running each wrapper on the images and saves most of the evaluation time.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from gevit_lib import __version__
from gevit_lib.augment import Augment, random_d4, random_rotation
from gevit_lib.data import MNIST_BACKGROUND, evenly_spaced, random_subset, take_subset
from gevit_lib.files import MissingFileError, atomic_write
from gevit_lib.posthoc import FINETUNE_MODES, METHODS, VARIANTS, PostHoc, resolve_method
from gevit_lib.profiles import PostHocProfile, posthoc_profile

__all__ = [
    "MNIST_METHODS",
    "PCAM_METHODS",
    "PCAM_BACKBONES",
    "PostHocResult",
    "rotmnist",
    "mnist_to_rotmnist",
    "low_data",
    "pcam",
    "run_posthoc",
    "load_backbone",
    "load_pcam_cnn",
    "random_rotation",
    "random_d4",
    "take_subset",
    "evenly_spaced",
    "random_subset",
]

MNIST_METHODS: tuple[str, ...] = ("mean", "max", "sum", "most_probable", "most_certain", "learned_score",
                                  "learned_attention", "tta")
PCAM_METHODS: tuple[str, ...] = ("mean", "max", "sum", "most_probable", "most_certain", "tta")
# name -> Hugging Face repo (timm "hf-hub:" models). The post names the ResNet-50; its code loaded the DenseNet-161.
PCAM_BACKBONES: dict[str, str] = {
    "densenet161.tiatoolbox-pcam": "1aurent/densenet161.tiatoolbox-pcam",
    "resnet50.tiatoolbox-pcam": "1aurent/resnet50.tiatoolbox-pcam",
}



# ---------------------------------------------------------------------------------------------------------------
# Augmentations (on-device, all randomness from the generator that fit() seeds and checkpoints)


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class PostHocResult:
    """Rows (one per mode x method, plus the base model per mode), metadata and where they were written."""

    experiment: str
    profile: str
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    out_dir: Path | None = None
    modes: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()

    @property
    def csv_path(self) -> Path | None:
        return self.out_dir / "results.csv" if self.out_dir else None

    @property
    def markdown_path(self) -> Path | None:
        return self.out_dir / "results.md" if self.out_dir else None

    def accuracy(self, method: str, mode: str = "none", split: str = "test") -> float:
        """Accuracy in percent of ``method`` ("base" for the backbone alone) in ``mode`` on "val" or "test"."""
        key = "base" if method == "base" else resolve_method(method)
        for row in self.rows:
            if row["method"] == key and row["mode"] == mode:
                return float(row[f"{split}_acc"])
        raise KeyError(f"no result for method {method!r} in mode {mode!r}")

    def markdown(self) -> str:
        """Method x mode table of validation / test accuracy (percent), with the provenance above it."""
        m = self.meta
        lines = [f"# Post-hoc equivariance: {self.experiment} (profile {self.profile})", "",
                 f"- data: {m.get('data_source')}; validation {m.get('n_val')} / test {m.get('n_test')} images; "
                 f"finetune set {m.get('n_train')} images",
                 f"- checkpoint: {m.get('checkpoint')}",
                 f"- groups: {m.get('groups')}; variant {m.get('variant')}; interpolation {m.get('interpolation')}",
                 f"- seed {m.get('seed')}; device {m.get('device')}; gevit_lib {m.get('gevit_lib_version')}", "",
                 "| method | group (T) | " + " | ".join(f"{mode}: val / test" for mode in self.modes) + " |",
                 "|---|---|" + "---|" * len(self.modes)]
        for method in ("base", *self.methods):
            cells, group = [], ""
            for mode in self.modes:
                row = next((r for r in self.rows if r["method"] == method and r["mode"] == mode), None)
                if row is None:
                    cells.append("-")
                else:
                    group = f"{row['group']} ({row['num_transforms']})" if method != "base" else "-"
                    cells.append(f"{row['val_acc']:.2f} / {row['test_acc']:.2f}")
            name = "base model" if method == "base" else METHODS[method].post_name
            lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with atomic_write(self.out_dir / "results.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        with atomic_write(self.out_dir / "results.md") as tmp:
            tmp.write_text(self.markdown())
        with atomic_write(self.out_dir / "meta.json") as tmp:
            tmp.write_text(json.dumps(self.meta, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Data helpers


def _size(data: Dataset | tuple[Tensor, Tensor]) -> int:
    return len(data[1]) if isinstance(data, tuple) else len(data)  # type: ignore[arg-type]


def _describe(ds: Dataset) -> dict[str, Any]:
    describe = getattr(ds, "describe", None)
    return describe() if callable(describe) else {"dataset": type(ds).__name__, "size": len(ds)}  # type: ignore


def _data_label(info: dict[str, Any]) -> str:
    label = info.get("label") or info.get("dataset", "?")
    return f"{info.get('dataset', '?')} [{info.get('source', '?')}: {label}]"


# ---------------------------------------------------------------------------------------------------------------
# Backbones


def load_backbone(checkpoint: str | os.PathLike[str] | nn.Module, preset: str = "mnist",
                  download: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A ViT (or any classifier) and a description of where it came from.

    ``checkpoint``: a published name (``vit_rotmnist``, ``vit_mnist``, ``vit_rotmnist_10pct``), a ``.pt`` state
    dict of the post's ViT (original key names, or a ``best.pt`` written by ``fit``), or an ``nn.Module``.
    """
    from gevit_lib.models import PUBLISHED, load_published
    from gevit_lib.models.vit import from_original_state_dict

    if isinstance(checkpoint, nn.Module):
        return checkpoint, {"checkpoint": f"model object {type(checkpoint).__name__}"}
    name = str(checkpoint)
    if name in PUBLISHED:
        model = load_published(name, download=download)
        return model, {"checkpoint": name, "checkpoint_sha256": PUBLISHED[name].sha256}
    path = Path(name).expanduser()
    if not path.is_file():
        raise MissingFileError(f"checkpoint {name!r} is neither a published name ({', '.join(PUBLISHED)}) nor a "
                               f"file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return from_original_state_dict(state, preset=preset).eval(), {"checkpoint": str(path)}


def load_pcam_cnn(name: str = "densenet161.tiatoolbox-pcam", weights: str | os.PathLike[str] | None = None,
                  download: bool = True) -> nn.Module:
    """The TIAToolbox PCam CNN through timm: ``hf-hub:1aurent/<name>`` (Hugging Face cache or download), or the
    architecture with a local ``weights`` file (``model.safetensors`` / ``pytorch_model.bin`` of that repo)."""
    import timm

    if name not in PCAM_BACKBONES:
        raise ValueError(f"unknown PCam backbone {name!r}; choose one of {list(PCAM_BACKBONES)}")
    repo = PCAM_BACKBONES[name]
    arch = name.split(".")[0]
    how_to = (f"Download the weights of https://huggingface.co/{repo} (e.g. `huggingface-cli download {repo}`, "
              f"which fills the Hugging Face cache), or pass weights=<path to its model.safetensors>.")
    if weights is not None:
        from gevit_lib.hub import load_into

        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingFileError(f"PCam CNN weights {path} not found. {how_to}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model(arch, pretrained=False, num_classes=2)
        return load_into(model, state, source=str(path)).eval()
    if not download:
        from huggingface_hub import try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(repo, f), str)
                     for f in ("model.safetensors", "pytorch_model.bin"))
        if not cached:
            raise MissingFileError(f"the PCam CNN {name} is not in the Hugging Face cache and download=False. "
                                   f"{how_to}")
    try:
        return timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()
    except Exception as exc:  # offline, hub errors, missing huggingface_hub
        raise MissingFileError(f"could not load the PCam CNN {name} from the Hugging Face hub ({exc}). {how_to}") \
            from exc


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# The runner


@dataclass
class _Cache:
    """Embeddings of the transformed val / test images under the untouched backbone, per group."""

    embeddings: dict[tuple[str, str], tuple[Tensor, Tensor]] = field(default_factory=dict)


@torch.no_grad()
def _transformed_embeddings(ph: PostHoc, data: Dataset | tuple[Tensor, Tensor], batch_size: int,
                            device: torch.device, progress: bool, desc: str) -> tuple[Tensor, Tensor]:
    ph.eval().to(device)
    dataset = TensorDataset(*data) if isinstance(data, tuple) else data
    out, labels = [], []
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False), desc=desc, leave=False,
                     disable=not progress):
        out.append(ph.transformed_embeddings(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def run_posthoc(experiment: str, backbone: nn.Module, train_data: Dataset | tuple[Tensor, Tensor],
                val_data: Dataset | tuple[Tensor, Tensor], test_data: Dataset | tuple[Tensor, Tensor], *,
                settings: PostHocProfile, profile: str, methods: Sequence[str], modes: Sequence[str],
                augment: Augment | None, variant: str = "original", interpolation: str = "nearest",
                seed: int = 42, device: str = "cpu", out_dir: Path | None = None, resume: bool = False,
                progress: bool = True, meta: dict[str, Any] | None = None) -> PostHocResult:
    """Evaluate (and finetune) every method in every mode on prepared data; see the module docstring."""
    from gevit_lib.train import TrainConfig, evaluate, fit, resolve_device, seed_everything

    methods = tuple(resolve_method(m) for m in methods)
    modes = tuple(modes)
    bad = [m for m in modes if m not in FINETUNE_MODES]
    if bad:
        raise ValueError(f"unknown finetune modes {bad}; choose from {FINETUNE_MODES}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    dev = resolve_device(device)
    template = backbone.cpu().eval()
    batchnorm = _has_batchnorm(template)

    def group_of(method: str) -> str:
        if METHODS[method].learned:
            return settings.learned_group
        return settings.tta_group if method == "tta" else settings.group

    meta = {**(meta or {}), "experiment": experiment, "profile": profile, "settings": settings.to_dict(),
            "methods": list(methods), "modes": list(modes), "variant": variant, "interpolation": interpolation,
            "seed": seed, "device": str(dev), "n_train": _size(train_data), "n_val": _size(val_data),
            "n_test": _size(test_data), "groups": {m: group_of(m) for m in methods},
            "gevit_lib_version": __version__, "torch_version": torch.__version__,
            "started": datetime.now().isoformat(timespec="seconds")}
    result = PostHocResult(experiment, profile, [], meta, out_dir, modes, methods)
    common = {"experiment": experiment, "profile": profile, "seed": seed, "variant": variant,
              "data_source": meta.get("data_source"), "checkpoint": meta.get("checkpoint")}

    # the backbone alone (the first row of the original CSVs)
    t0 = time.perf_counter()
    base_val = evaluate(template, val_data, batch_size=settings.eval_batch_size, device=str(dev))
    base_test = evaluate(template, test_data, batch_size=settings.eval_batch_size, device=str(dev))
    base_seconds = time.perf_counter() - t0
    template.cpu()
    cache = _Cache()

    def cached(ph: PostHoc, split: str) -> tuple[Tensor, Tensor]:
        key = (ph.group.name, split)
        if key not in cache.embeddings:
            data = val_data if split == "val" else test_data
            cache.embeddings[key] = _transformed_embeddings(ph, data, settings.eval_batch_size, dev, progress,
                                                            f"{split} embeddings {ph.group.name}")
        return cache.embeddings[key]

    for mode in modes:
        result.rows.append({**common, "mode": mode, "method": "base", "post_name": "base model", "group": "",
                            "num_transforms": 1, "val_acc": 100 * base_val["accuracy"],
                            "test_acc": 100 * base_test["accuracy"], "trained": False, "epochs": 0,
                            "best_epoch": "", "initial_val_acc": "", "seconds": round(base_seconds, 2)})
        for method in methods:
            t0 = time.perf_counter()
            seed_everything(seed)
            ph = PostHoc(copy.deepcopy(template), method, group_of(method), variant=variant,
                         interpolation=interpolation, finetune=mode)
            trains = mode != "none" or METHODS[method].learned
            # frozen backbone without running statistics: its embeddings never change, share them
            shared = not trains or (mode != "model" and not batchnorm)
            epochs = settings.epochs_attention if method == "learned_attention" else settings.epochs
            best_epoch: Any = ""
            initial: Any = ""
            if trains:
                config = TrainConfig(epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer,
                                     lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov,
                                     seed=seed, device=str(dev), eval_batch_size=settings.eval_batch_size,
                                     select_initial=True, label=f"{method}/{mode}")
                val_for_fit = cached(ph, "val") if shared else val_data
                fitted = fit(ph, train_data, val_for_fit, config, augment=augment, progress=progress,
                             run_dir=out_dir / "fits" / mode / method if out_dir is not None else None,
                             resume=resume)
                best_epoch = fitted.best_epoch
                initial = 100 * fitted.initial_val["accuracy"] if fitted.initial_val else ""
            bs = settings.eval_batch_size
            if shared:
                val = evaluate(ph, cached(ph, "val"), batch_size=bs, device=str(dev))
                test = evaluate(ph, cached(ph, "test"), batch_size=bs, device=str(dev))
            else:
                val = evaluate(ph, val_data, batch_size=bs, device=str(dev), progress=progress)
                test = evaluate(ph, test_data, batch_size=bs, device=str(dev), progress=progress)
            result.rows.append({**common, "mode": mode, "method": method, "post_name": METHODS[method].post_name,
                                "group": ph.group.name, "num_transforms": ph.num_transforms,
                                "val_acc": 100 * val["accuracy"], "test_acc": 100 * test["accuracy"],
                                "trained": trains, "epochs": epochs if trains else 0, "best_epoch": best_epoch,
                                "initial_val_acc": initial, "seconds": round(time.perf_counter() - t0, 2)})
            if progress:
                tqdm.write(f"{experiment} [{mode}] {method}: val {100 * val['accuracy']:.2f} "
                           f"test {100 * test['accuracy']:.2f}")
            result.write()
            del ph
    result.meta["finished"] = datetime.now().isoformat(timespec="seconds")
    result.write()
    return result


# ---------------------------------------------------------------------------------------------------------------
# The experiments


def _out_dir(out_dir: str | os.PathLike[str] | None, experiment: str, profile: str) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    return Path("runs") / f"posthoc_{experiment}" / f"{profile}-{datetime.now():%Y%m%d-%H%M%S}"


def _check_names(methods: Sequence[str] | None, default: Sequence[str], modes: Sequence[str] | None,
                 settings: PostHocProfile) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(resolve_method(m) for m in (methods or default)), tuple(modes or settings.modes))


def _train_vit(preset: str, train: Any, val: Any, settings: PostHocProfile, augment: Augment | None,
               out_dir: Path, device: str, seed: int, progress: bool, resume: bool,
               optimizer: str = "adam", weight_decay: float = 0.0, schedule: str = "constant",
               warmup_epochs: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """Train the post's ViT from scratch (``checkpoint="train"``), best validation epoch kept."""
    from gevit_lib.models.vit import build_vit
    from gevit_lib.train import TrainConfig, fit, seed_everything

    seed_everything(seed)
    model = build_vit(preset)
    config = TrainConfig(epochs=settings.train_epochs, batch_size=settings.train_batch_size, optimizer=optimizer,
                         lr=settings.train_lr, weight_decay=weight_decay, schedule=schedule,
                         warmup_epochs=min(warmup_epochs, settings.train_epochs), seed=seed, device=device,
                         eval_batch_size=settings.eval_batch_size, label=f"train ViT ({preset})")
    run_dir = out_dir / "backbone"
    result = fit(model, train, val, config, augment=augment, run_dir=run_dir, resume=resume, progress=progress)
    return model.cpu().eval(), {"checkpoint": f"trained here: {run_dir / 'best.pt'}",
                                "backbone_training": {"config": config.to_dict(), "best_epoch": result.best_epoch,
                                                      "best_val": result.best_val, "n_train": _size(train)}}


def _settings(experiment: str, profile: str, overrides: dict[str, Any] | None) -> PostHocProfile:
    settings = posthoc_profile(experiment, profile)
    if overrides:
        known = set(settings.to_dict())
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown profile overrides {unknown}; valid: {sorted(known)}")
        settings = replace(settings, **overrides)
    return settings


def _mnist_experiment(experiment: str, profile: str, checkpoint: str | os.PathLike[str] | nn.Module,
                      root: str | os.PathLike[str] | None, source: str, fraction: float,
                      methods: Sequence[str] | None, modes: Sequence[str] | None, variant: str, interpolation: str,
                      seed: int, device: str, out_dir: str | os.PathLike[str] | None, resume: bool,
                      progress: bool, overrides: dict[str, Any] | None) -> PostHocResult:
    from gevit_lib.data import mnist, rotated_mnist

    settings = _settings(experiment, profile, overrides)
    methods_, modes_ = _check_names(methods, MNIST_METHODS, modes, settings)
    out = _out_dir(out_dir, experiment, profile)
    train_ds = rotated_mnist("train", source=source, root=root, fraction=fraction)
    val_ds = rotated_mnist("validation", source=source, root=root)
    test_ds = rotated_mnist("test", source=source, root=root)
    val = take_subset(val_ds, evenly_spaced(len(val_ds), settings.n_val))
    test = take_subset(test_ds, evenly_spaced(len(test_ds), settings.n_test))
    train = take_subset(train_ds, random_subset(len(train_ds), settings.n_train, seed))
    meta: dict[str, Any] = {"data": {"train": _describe(train_ds), "validation": _describe(val_ds),
                                     "test": _describe(test_ds)},
                            "data_source": _data_label(_describe(test_ds)), "rotated_mnist_source": test_ds.source}
    if isinstance(checkpoint, str) and checkpoint == "train":
        if experiment == "mnist_to_rotmnist":  # the post's MNIST ViT: upright MNIST, no augmentation
            bb_train_ds, bb_val_ds, bb_aug = mnist("train", root=root), mnist("validation", root=root), None
        else:  # rotated MNIST with random rotations and flips (SPEC 4)
            bb_train_ds, bb_val_ds = train_ds, val_ds
            bb_aug = random_rotation(180.0, fill=MNIST_BACKGROUND, flips=True)
        bb_train = take_subset(bb_train_ds, random_subset(len(bb_train_ds), settings.train_subset, seed))
        bb_val = take_subset(bb_val_ds, evenly_spaced(len(bb_val_ds), settings.n_val))
        backbone, where = _train_vit("mnist", bb_train, bb_val, settings, bb_aug, out, device, seed, progress, resume)
        where["backbone_training"]["data"] = _data_label(_describe(bb_train_ds))
    else:
        backbone, where = load_backbone(checkpoint, "mnist")
    meta.update(where)
    augment = random_rotation(180.0, fill=MNIST_BACKGROUND)  # finetuning: RandomRotation(-180, 180)
    return run_posthoc(experiment, backbone, train, val, test, settings=settings, profile=profile, methods=methods_,
                       modes=modes_, augment=augment, variant=variant, interpolation=interpolation, seed=seed,
                       device=device, out_dir=out, resume=resume, progress=progress, meta=meta)


def rotmnist(profile: str = "quick", *, checkpoint: str | os.PathLike[str] | nn.Module = "vit_rotmnist",
             root: str | os.PathLike[str] | None = None, source: str = "auto", methods: Sequence[str] | None = None,
             modes: Sequence[str] | None = None, variant: str = "original", interpolation: str = "nearest",
             seed: int = 42, device: str = "cpu", out_dir: str | os.PathLike[str] | None = None,
             resume: bool = False, progress: bool = True,
             overrides: dict[str, Any] | None = None) -> PostHocResult:
    """Experiment 1 (SPEC 8.1): a ViT trained on rotated MNIST, post-hoc methods evaluated on rotated MNIST.

    ``checkpoint``: published name (default ``vit_rotmnist``), ViT state-dict file, model, or ``"train"``.
    ``source``: rotated-MNIST source ("auto": official archive when present, else regenerated; recorded in the
    results). ``methods`` / ``modes`` default to all / the profile's. ``variant``: "original" (the code's
    formulas) or "post". ``out_dir`` default: ``runs/posthoc_rotmnist/<profile>-<timestamp>``; with the same
    ``out_dir`` and ``resume=True`` finished finetuning runs are reused. ``overrides``: profile fields to change
    (e.g. ``{"n_test": 5000}``), recorded in the results.
    """
    return _mnist_experiment("rotmnist", profile, checkpoint, root, source, 1.0, methods, modes, variant,
                             interpolation, seed, device, out_dir, resume, progress, overrides)


def mnist_to_rotmnist(profile: str = "quick", *, checkpoint: str | os.PathLike[str] | nn.Module = "vit_mnist",
                      root: str | os.PathLike[str] | None = None, source: str = "auto",
                      methods: Sequence[str] | None = None, modes: Sequence[str] | None = None,
                      variant: str = "original", interpolation: str = "nearest", seed: int = 42,
                      device: str = "cpu", out_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                      progress: bool = True, overrides: dict[str, Any] | None = None) -> PostHocResult:
    """Experiment 2 (SPEC 8.2): a ViT trained on upright MNIST, evaluated on rotated MNIST.

    As in the original, finetuning (modes "head" / "model" and the learned aggregators) uses rotated-MNIST
    training images, so those rows are not "trained on upright MNIST only". ``checkpoint="train"`` trains the
    ViT on upright MNIST here. Other arguments as :func:`rotmnist`.
    """
    return _mnist_experiment("mnist_to_rotmnist", profile, checkpoint, root, source, 1.0, methods, modes, variant,
                             interpolation, seed, device, out_dir, resume, progress, overrides)


def low_data(profile: str = "quick", *, checkpoint: str | os.PathLike[str] | nn.Module = "vit_rotmnist_10pct",
             root: str | os.PathLike[str] | None = None, source: str = "auto", fraction: float = 0.1,
             methods: Sequence[str] | None = None, modes: Sequence[str] | None = None, variant: str = "original",
             interpolation: str = "nearest", seed: int = 42, device: str = "cpu",
             out_dir: str | os.PathLike[str] | None = None, resume: bool = False,
             progress: bool = True, overrides: dict[str, Any] | None = None) -> PostHocResult:
    """Experiment 3 (SPEC 8.3): a ViT trained on ``fraction`` (10%: 1,000 images) of rotated MNIST; finetuning
    uses the same fraction of the training split. Other arguments as :func:`rotmnist`."""
    return _mnist_experiment("low_data", profile, checkpoint, root, source, fraction, methods, modes, variant,
                             interpolation, seed, device, out_dir, resume, progress, overrides)


def pcam(profile: str = "quick", *, backbone: str | nn.Module = "densenet161.tiatoolbox-pcam",
         weights: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] | None = None,
         normalize: bool | None = None, methods: Sequence[str] | None = None, modes: Sequence[str] | None = None,
         variant: str = "original", seed: int = 42, device: str = "cpu",
         out_dir: str | os.PathLike[str] | None = None, resume: bool = False, download: bool = True,
         progress: bool = True, overrides: dict[str, Any] | None = None) -> PostHocResult:
    """Experiment 4 (SPEC 8.4): a pretrained CNN on PatchCamelyon, 4 rotations + flips (D4) for every method.

    ``backbone``: "densenet161.tiatoolbox-pcam" (what the original code loaded, default) or
    "resnet50.tiatoolbox-pcam" (what the post names), both ``hf-hub:1aurent/...`` through timm (``weights``: a
    local weights file instead of the hub); "vit" trains the post's PCam ViT here; or any classifier module.
    ``normalize``: PCam mean/std normalisation of the inputs (default: off for the TIAToolbox CNNs, which take
    [0, 1] pixels as in the original, on otherwise). Needs the PCam h5 files in ``<root>/pcam`` (see
    :func:`gevit_lib.data.pcam`); missing data or weights raise ``MissingFileError`` saying what to download.
    """
    from gevit_lib.data import pcam as pcam_data

    settings = _settings("pcam", profile, overrides)
    methods_, modes_ = _check_names(methods, PCAM_METHODS, modes, settings)
    hub = isinstance(backbone, str) and backbone != "vit"
    if isinstance(backbone, str) and backbone != "vit" and backbone not in PCAM_BACKBONES:
        raise ValueError(f"unknown PCam backbone {backbone!r}; choose one of {[*PCAM_BACKBONES, 'vit']} or pass a "
                         f"model")
    norm = (not hub) if normalize is None else normalize
    splits = {s: pcam_data(s, root=root, normalize=norm) for s in ("train", "validation", "test")}  # data first
    out = _out_dir(out_dir, "pcam", profile)
    val = take_subset(splits["validation"], evenly_spaced(len(splits["validation"]), settings.n_val))
    test = take_subset(splits["test"], evenly_spaced(len(splits["test"]), settings.n_test))
    train = take_subset(splits["train"], random_subset(len(splits["train"]), settings.n_train, seed))
    meta: dict[str, Any] = {"data": {s: _describe(d) for s, d in splits.items()},
                            "data_source": _data_label(_describe(splits["test"])), "normalize": norm}
    if isinstance(backbone, nn.Module):
        model, meta["checkpoint"] = backbone, f"model object {type(backbone).__name__}"
    elif backbone == "vit":
        bb_train = take_subset(splits["train"], random_subset(len(splits["train"]), settings.train_subset, seed))
        model, where = _train_vit("pcam", bb_train, val, settings, random_d4(), out, device, seed, progress, resume,
                                  optimizer="sgd", weight_decay=1e-4, schedule="warmup_cosine", warmup_epochs=1.0)
        meta.update(where)
    else:
        model = load_pcam_cnn(backbone, weights, download=download)
        meta["checkpoint"] = f"{backbone} ({weights or 'hf-hub:' + PCAM_BACKBONES[backbone]})"
    return run_posthoc("pcam", model, train, val, test, settings=settings, profile=profile, methods=methods_,
                       modes=modes_, augment=random_d4(), variant=variant, seed=seed, device=device, out_dir=out,
                       resume=resume, progress=progress, meta=meta)
