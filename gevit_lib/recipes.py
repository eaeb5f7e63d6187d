"""The post's training runs as data: model, data, augmentation, optimiser, schedule, epochs and batch size of each
experiment that ``python -m gevit_lib.run`` trains. :func:`get_recipe` scales a recipe to a profile
(:mod:`gevit_lib.profiles`) and applies the caller's checked changes; the helpers below turn it into what ``fit``
takes.

Sources: GE-ViT, the original repository's README commands (rotated MNIST: Adam 1e-3, weight decay 1e-4, batch 8,
300 epochs; PCam: SGD 1e-2, momentum 0.9, weight decay 1e-4, 10 warm-up epochs then cosine, batch 16, 100 epochs);
the post's ViT, its training script (Adam 1e-3, 500 epochs, batch 128, random rotations and flips on rotated MNIST;
batch 1024 without augmentation on upright MNIST).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

from torch import nn

from .augment import Augment, random_rotation
from .data import MNIST_BACKGROUND, mnist, pcam, random_subset, rotated_mnist, take_subset
from .groups import get_group
from .models.gevit import build_gevit
from .models.vit import build_vit
from .profiles import training_profile
from .train import TrainConfig

__all__ = ["Recipe", "RECIPES", "SETTINGS", "get_recipe", "check_setting", "build_model", "model_config",
           "load_splits", "augmentation", "train_config"]

MODEL_BUILDERS = {"build_gevit": build_gevit, "build_vit": build_vit}
AUGMENTATIONS = {
    # RandomRotation(-180, 180) + horizontal and vertical flips, exposed corners black (the post's ViT)
    "rotations_and_flips": lambda: random_rotation(180.0, fill=MNIST_BACKGROUND, flips=True),
}


@dataclass(frozen=True)
class Recipe:
    """One training run of the post. ``model`` names a builder (``build_gevit`` / ``build_vit``) called with
    ``model_args``; ``options`` are the model arguments a user may change (``group``, ``patch_size``).
    ``data_args``: ``fraction`` (of the training split) and ``digits`` (kept classes). ``family``: the row of the
    profile table that scales this recipe. ``n_*`` None: the whole split."""

    name: str
    description: str
    family: str
    model: str
    model_args: Mapping[str, Any]
    dataset: str  # "rotated_mnist" | "mnist" | "pcam"
    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    data_args: Mapping[str, Any] = field(default_factory=dict)
    augmentation: str | None = None
    weight_decay: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    eval_batch_size: int | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    options: tuple[str, ...] = ()


_GEVIT_ROTMNIST = dict(family="gevit_rotmnist", model="build_gevit", dataset="rotated_mnist", optimizer="adam",
                       lr=1e-3, weight_decay=1e-4, epochs=300, batch_size=8, options=("group", "patch_size"),
                       model_args={"preset": "rotmnist", "group": "p4", "patch_size": 9})
_VIT_MNIST = dict(family="vit_mnist", model="build_vit", model_args={"preset": "mnist"}, optimizer="adam", lr=1e-3,
                  epochs=500, batch_size=128, eval_batch_size=128)
RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("gevit_rotmnist", "GE-ViT on rotated MNIST (post: p4, patch 9, 300 epochs)", **_GEVIT_ROTMNIST),
    Recipe("gevit_rotmnist_10pct", "GE-ViT on 10% of rotated MNIST", **_GEVIT_ROTMNIST, data_args={"fraction": 0.1}),
    Recipe("gevit_rotmnist_3v8", "GE-ViT p4m on the threes and eights of rotated MNIST",
           **{**_GEVIT_ROTMNIST, "options": ("patch_size",),
              "model_args": {"preset": "rotmnist", "group": "p4m", "patch_size": 9, "num_classes": 2}},
           data_args={"digits": [3, 8]}),
    Recipe("gevit_pcam", "GE-ViT on PCam (post: p4, patch 5, 100 epochs)", family="gevit_pcam", model="build_gevit",
           model_args={"preset": "pcam", "group": "p4", "patch_size": 5}, dataset="pcam", optimizer="sgd", lr=1e-2,
           momentum=0.9, weight_decay=1e-4, schedule="warmup_cosine", warmup_epochs=10.0, epochs=100,
           batch_size=16, options=("group", "patch_size")),
    Recipe("vit_rotmnist", "the post's ViT on rotated MNIST (random rotations and flips)", **_VIT_MNIST,
           dataset="rotated_mnist", augmentation="rotations_and_flips"),
    Recipe("vit_mnist", "the post's ViT on upright MNIST (no augmentation, batch 1024)",
           **{**_VIT_MNIST, "batch_size": 1024}, dataset="mnist"),
    Recipe("vit_rotmnist_10pct", "the post's ViT on 10% of rotated MNIST", **_VIT_MNIST, dataset="rotated_mnist",
           data_args={"fraction": 0.1}, augmentation="rotations_and_flips"),
]}


class _Setting(NamedTuple):
    kind: type  # int or float
    minimum: float
    strict: bool = False  # value > minimum instead of >=
    none: str = ""  # what None means, when allowed


# Recipe fields a user may change (``--set FIELD=VALUE``), with their type and range.
SETTINGS: dict[str, _Setting] = {
    "epochs": _Setting(int, 1), "batch_size": _Setting(int, 1), "eval_batch_size": _Setting(int, 1),
    "lr": _Setting(float, 0, strict=True), "weight_decay": _Setting(float, 0), "momentum": _Setting(float, 0),
    "warmup_epochs": _Setting(float, 0), "n_train": _Setting(int, 1, none="the whole split"),
    "n_val": _Setting(int, 1, none="the whole split"), "n_test": _Setting(int, 1, none="the whole split"),
}


def check_setting(name: str, value: Any) -> Any:
    """``value`` if it suits the recipe field ``name`` (type and range), else a ValueError saying what would."""
    if name not in SETTINGS:
        raise ValueError(f"{name!r} cannot be set; settable fields: {', '.join(SETTINGS)}")
    s = SETTINGS[name]
    if value is None and s.none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) if s.kind is int else math.isfinite(value))
    if not (ok and (value > s.minimum if s.strict else value >= s.minimum)):
        what = f"{'an integer' if s.kind is int else 'a number'} {'>' if s.strict else '>='} {s.minimum:g}"
        raise ValueError(f"{name} must be {what}{f' or null ({s.none})' if s.none else ''}, got {value!r}")
    return s.kind(value)


def get_recipe(name: str, profile: str = "full", *, model_changes: Mapping[str, Any] | None = None,
               **changes: Any) -> Recipe:
    """The recipe ``name`` scaled to ``profile``; ``changes`` replace fields of :data:`SETTINGS` (after the
    profile), ``model_changes`` the model arguments listed in the recipe's ``options``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    scale = training_profile(recipe.family, profile)
    scaled = {k: v for k, v in asdict(scale).items() if v is not None or k.startswith("n_")}
    recipe = replace(recipe, **{**scaled, **{k: check_setting(k, v) for k, v in changes.items()}})
    model_changes = dict(model_changes or {})
    unused = sorted(set(model_changes) - set(recipe.options))
    if unused:
        fixed = ", ".join(f"{k}={recipe.model_args.get(k)!r}" for k in unused)
        raise ValueError(f"{name} does not take {unused} (its model has {fixed}); it takes "
                         f"{list(recipe.options) or 'no model options'}")
    if "patch_size" in model_changes:
        p = model_changes["patch_size"]
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"patch_size must be an integer >= 1, got {p!r}")
    if "group" in model_changes:
        get_group(model_changes["group"])  # an unknown group fails here, with the list of known ones
    return replace(recipe, model_args={**recipe.model_args, **model_changes})


def model_config(recipe: Recipe) -> dict[str, Any]:
    """What defines the trained function and its data (recorded in the run folder; a resume must match it)."""
    return {"builder": recipe.model, "kwargs": dict(recipe.model_args),
            "data": {"dataset": recipe.dataset, **recipe.data_args, "n_train": recipe.n_train,
                     "n_val": recipe.n_val, "n_test": recipe.n_test}}


def build_model(recipe: Recipe) -> nn.Module:
    return MODEL_BUILDERS[recipe.model](**recipe.model_args)


def load_splits(recipe: Recipe, data_dir: str | None, seed: int) -> tuple[Any, Any, Any]:
    """Train, validation and test data, each a seeded random subset of ``n_*`` images (None: the whole split);
    ``fraction`` applies to the training split only."""
    args = dict(recipe.data_args)
    fraction = args.pop("fraction", 1.0)
    loaders = {"rotated_mnist": rotated_mnist, "mnist": mnist, "pcam": pcam}
    out = []
    for split, n in (("train", recipe.n_train), ("validation", recipe.n_val), ("test", recipe.n_test)):
        ds = loaders[recipe.dataset](split, root=data_dir, fraction=fraction if split == "train" else 1.0, **args)
        out.append(take_subset(ds, random_subset(len(ds), n, seed)))
    return out[0], out[1], out[2]


def augmentation(recipe: Recipe) -> Augment | None:
    return AUGMENTATIONS[recipe.augmentation]() if recipe.augmentation else None


def train_config(recipe: Recipe, *, seed: int = 0, device: str = "auto", num_workers: int = 0,
                 label: str = "") -> TrainConfig:
    return TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, optimizer=recipe.optimizer, lr=recipe.lr,
                       weight_decay=recipe.weight_decay, momentum=recipe.momentum, schedule=recipe.schedule,
                       warmup_epochs=recipe.warmup_epochs, seed=seed, device=device,
                       num_workers=num_workers, eval_batch_size=recipe.eval_batch_size, label=label or recipe.name)
