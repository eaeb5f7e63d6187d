"""The one place that maps a run profile ("smoke" | "quick" | "tables" | "full") to sizes: subsets, epochs, batches,
groups. ``smoke``: seconds (the tests); ``quick``: minutes on a small CPU; ``full``: the post's settings (a GPU);
``tables``: the post-hoc MNIST notebooks 06-08 on the whole splits, finetuned on cached embeddings (see README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

__all__ = ["PROFILES", "check_profile", "PostHocProfile", "posthoc_profile", "TrainingProfile", "training_profile",
           "ModelZooProfile", "MODEL_ZOO_DATASETS", "model_zoo_profile", "EqualComputeProfile", "equal_compute_profile",
           "FigureProfile", "figure_profile"]

PROFILES: tuple[str, ...] = ("smoke", "quick", "tables", "full")
TABLES_NOTEBOOKS = "notebooks 06-08 (the post-hoc MNIST experiments rotmnist, mnist_to_rotmnist, low_data)"
T = TypeVar("T")


def check_profile(profile: str) -> str:
    """``profile`` if it is a known name, else a ValueError listing the valid ones."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


def _lookup(table: dict[str, dict[str, T]], key: str, profile: str, unknown: str) -> T:
    """``table[key][profile]``, or a ValueError naming the bad profile or (after ``unknown``) the bad key."""
    check_profile(profile)
    if key not in table:
        raise ValueError(f"{unknown} {key!r}; choose one of {', '.join(table)}")
    if profile not in table[key]:
        raise ValueError(f"profile {profile!r} is not defined for {key!r}; it covers only {TABLES_NOTEBOOKS}")
    return table[key][profile]


def _override(sizes: T, overrides: dict[str, Any] | None, what: str) -> T:
    """``sizes`` with ``overrides`` of its fields, or a ValueError naming the unknown fields."""
    known = sorted(f.name for f in fields(sizes))
    unknown = sorted(set(overrides or {}) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} profile field(s) {unknown}; known: {known}")
    return replace(sizes, **(overrides or {}))


@dataclass(frozen=True)
class PostHocProfile:
    """Sizes of one post-hoc experiment run (``None``: the whole split); ``epochs`` ... ``nesterov``: finetuning."""

    n_train: int | None
    n_val: int | None
    n_test: int | None
    epochs: int
    epochs_attention: int
    batch_size: int
    eval_batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    group: str  # the fixed aggregators' group
    learned_group: str  # the learned aggregators' group
    tta_group: str  # the test-time-augmentation baseline's (the original's default D4)
    modes: tuple[str, ...]
    extra_learned_groups: tuple[str, ...] = ()  # more learned-aggregator rows with these groups (not in the post)
    # finetuning (head, learned aggregators) on the cached embeddings of the un-augmented training digits with the
    # frozen backbone in eval mode, not (the original) on randomly rotated digits with its dropout on
    cached_training: bool = False
    canonical_groups: tuple[str, ...] = ()  # learned-canonicalization rows (gevit_lib.canonical; not in the post)
    canonical_epochs: int = 1  # ... trained on images for this many epochs
    canonical_prior: float = 0.0  # ... with Mondal et al.'s prior at this weight (0: off)
    speed_batch: int = 64  # the images/s column: this many test images, best of speed_repeats calls
    speed_repeats: int = 3


_MNIST_FULL = PostHocProfile(
    n_train=None, n_val=None, n_test=None, epochs=25, epochs_attention=60, batch_size=128, eval_batch_size=128,
    optimizer="adam", lr=5e-4, momentum=0.0, nesterov=False, group="C16", learned_group="D4", tta_group="D4",
    modes=("none", "head", "model"), extra_learned_groups=("C16",), canonical_groups=("C4", "D4", "C16"),
    canonical_epochs=25)
# the whole splits, the post's finetuning on cached embeddings, no full-model finetuning (est. ~30 min a notebook)
# (canonicalization trains on the images, not on cached embeddings: ~50 min more at this size, so quick and full only)
_MNIST_TABLES = replace(_MNIST_FULL, modes=("none", "head"), cached_training=True, canonical_groups=())
_MNIST_QUICK = replace(_MNIST_FULL, n_train=256, n_val=500, n_test=2000, epochs=1, epochs_attention=2,
                       batch_size=64, eval_batch_size=128, modes=("none", "head"), canonical_epochs=5, speed_batch=32)
_MNIST_SMOKE = replace(_MNIST_FULL, n_train=64, n_val=32, n_test=64, epochs=1, epochs_attention=1, batch_size=32,
                       eval_batch_size=64, modes=("none", "head"), group="C4", extra_learned_groups=("C4",),
                       canonical_groups=("C4", "D4", "C8"), canonical_epochs=1, speed_batch=8, speed_repeats=1)

_PCAM_FULL = PostHocProfile(
    n_train=None, n_val=None, n_test=None, epochs=3, epochs_attention=3, batch_size=64, eval_batch_size=128,
    optimizer="sgd", lr=1e-3, momentum=0.9, nesterov=True, group="D4", learned_group="D4", tta_group="D4",
    modes=("none", "head"), canonical_groups=("C4", "D4"), canonical_epochs=3)
_PCAM_QUICK = replace(_PCAM_FULL, n_train=128, n_val=128, n_test=256, epochs=1, epochs_attention=1, batch_size=32,
                      eval_batch_size=32, canonical_epochs=1, speed_batch=16)
_PCAM_SMOKE = replace(_PCAM_FULL, n_train=16, n_val=8, n_test=8, epochs=1, epochs_attention=1, batch_size=8,
                      eval_batch_size=8, canonical_epochs=1, speed_batch=4, speed_repeats=1)

_MNIST = {"smoke": _MNIST_SMOKE, "quick": _MNIST_QUICK, "tables": _MNIST_TABLES, "full": _MNIST_FULL}
_TABLE: dict[str, dict[str, PostHocProfile]] = {
    "rotmnist": _MNIST, "low_data": _MNIST,
    # canonicalization of a backbone trained on upright digits: Mondal et al.'s prior (equiadapt's default weight)
    "mnist_to_rotmnist": {name: replace(p, canonical_prior=100.0) for name, p in _MNIST.items()},
    "pcam": {"smoke": _PCAM_SMOKE, "quick": _PCAM_QUICK, "full": _PCAM_FULL},
}


def posthoc_profile(experiment: str, profile: str) -> PostHocProfile:
    """Sizes for a post-hoc experiment ("rotmnist", "mnist_to_rotmnist", "low_data", "pcam") at a profile."""
    return _lookup(_TABLE, experiment, profile, "unknown post-hoc experiment")


# ---- training recipes (gevit_lib.recipes, run from the command line by gevit_lib.run) ----------------------------
@dataclass(frozen=True)
class TrainingProfile:
    """How a profile scales a recipe of :mod:`gevit_lib.recipes`: subset sizes (None: the whole split) and, unless
    None, the epochs / batch sizes / warm-up that replace the recipe's (the post's)."""

    n_train: int | None
    n_val: int | None
    n_test: int | None
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    warmup_epochs: float | None = None


_TRAINING_FULL = TrainingProfile(n_train=None, n_val=None, n_test=None)
# Rows are recipe families: GE-ViT on rotated MNIST, GE-ViT on PCam, the post's ViT on (rotated) MNIST.
_TRAINING: dict[str, dict[str, TrainingProfile]] = {
    "gevit_rotmnist": {"full": _TRAINING_FULL,
                       "quick": TrainingProfile(n_train=256, n_val=200, n_test=200, epochs=1),
                       "smoke": TrainingProfile(n_train=16, n_val=8, n_test=8, epochs=1)},
    "gevit_pcam": {"full": _TRAINING_FULL,
                   "quick": TrainingProfile(n_train=64, n_val=32, n_test=32, epochs=1, warmup_epochs=0.0),
                   "smoke": TrainingProfile(n_train=8, n_val=4, n_test=4, epochs=1, warmup_epochs=0.0)},
    "vit_mnist": {"full": _TRAINING_FULL,
                  "quick": TrainingProfile(n_train=10000, n_val=500, n_test=2000, epochs=3),
                  "smoke": TrainingProfile(n_train=64, n_val=32, n_test=64, epochs=1, batch_size=32,
                                           eval_batch_size=64)},
}


def training_profile(family: str, profile: str) -> TrainingProfile:
    """How ``profile`` scales the recipes of ``family`` ("gevit_rotmnist", "gevit_pcam" or "vit_mnist")."""
    return _lookup(_TRAINING, family, profile, "no training profile for")


# ---- model zoo (notebook 10): the speed / size / accuracy table of the faster equivariant ViTs -------------------
MODEL_ZOO_DATASETS: tuple[str, ...] = ("rotmnist", "pcam")


@dataclass(frozen=True)
class ModelZooProfile:
    """Sizes of one model-zoo run (notebook 10; ``None``: the whole split). Training: AdamW, linear warm-up for
    ``warmup_fraction`` of the epochs, then cosine. GE-ViT-based models use attention dropout 0 in ``smoke`` /
    ``quick``, the post's 0.1 in ``full``."""

    n_train: int | None
    n_val: int | None
    n_test: int | None
    epochs: int
    hybrid_epochs: int  # the hybrids' epochs
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    augment: bool  # random 90-degree rotations and flips
    patch_sizes: tuple[int, ...]  # the PatchGEViT ablation (patch_group, mean embedding)
    patch_group: str
    extra_patch_models: tuple[tuple[str, int, str], ...]  # more (group, patch size, embed method) rows
    hybrid_groups: tuple[str, ...]  # one hybrid per group
    grid_gevit: dict[str, Any]  # architecture options, like the *_overrides
    embed_dim: int | None  # None: the preset's
    # hidden width of the mean embedding's patch MLP (None: one Linear layer, the post's design, which only sees a
    # patch's group-invariant linear projections -- for 2x2 patches under C4 just their mean)
    embed_hidden: int | None
    hybrid_overrides: dict[str, Any]
    vit_overrides: dict[str, Any]
    posthoc_groups: tuple[str, ...]  # post-hoc ViT rows (mean pooling, no finetuning)
    gevit_models: tuple[tuple[str, int], ...]  # full-image GE-ViT rows (group, neighbourhood)
    gevit_trained: tuple[tuple[str, int], ...]  # ... trained on gevit_n_train images, evaluated on gevit_n_eval
    gevit_overrides: dict[str, Any]
    gevit_n_train: int | None  # None: n_train
    gevit_n_eval: int | None  # None: n_val, n_test
    gevit_epochs: int
    gevit_speed_batch: int  # images per speed batch of the full-image GE-ViTs
    speed_batch: int  # ... of the others; speed_steps batches, speed_budget_s seconds per model and mode
    speed_steps: int
    speed_budget_s: float | None
    num_workers: int = 0  # data-loader processes (PCam is read lazily)
    # rows that take their accuracy from the authors' checkpoint (trained as gevit_trained when it cannot be found)
    gevit_published: tuple[tuple[str, int, str], ...] = ()


_NO_DROPOUT = {"attention_dropout": 0.0, "value_dropout": 0.0}
_ZOO_GEVIT_4 = (("p4", 5), ("p4", 9), ("p4m", 5), ("p4m", 9))

# quick: 8,000 training samples per model (2,000 images x 4 epochs), ~9 min on 2 idle cores; the full-image GE-ViT
# p4, P=5 row takes its accuracy from the authors' published checkpoint (a ~83% model; 200 validation / test images)
_ZOO_MNIST_QUICK = ModelZooProfile(
    n_train=2000, n_val=400, n_test=1000, epochs=4, hybrid_epochs=4, batch_size=32, eval_batch_size=100,
    lr=3e-3, weight_decay=0.01, warmup_fraction=0.2, augment=False,
    patch_sizes=(2, 4, 7, 14), patch_group="p4", extra_patch_models=(("p4m", 14, "mean"), ("p4", 7, "gcnn")),
    hybrid_groups=("p4",), grid_gevit={"num_channels": 12, "num_heads": 4, **_NO_DROPOUT}, embed_dim=32,
    embed_hidden=64, hybrid_overrides={}, vit_overrides={}, posthoc_groups=("C4", "C8", "C16"),
    gevit_models=_ZOO_GEVIT_4, gevit_trained=(("p4", 5),), gevit_overrides=dict(_NO_DROPOUT), gevit_n_train=16,
    gevit_n_eval=200, gevit_epochs=1, gevit_speed_batch=1, speed_batch=16, speed_steps=3, speed_budget_s=8.0,
    gevit_published=(("p4", 5, "gevit_p4sa_patch5_rotmnist"),))
_ZOO_MNIST_SMOKE = replace(
    _ZOO_MNIST_QUICK, n_train=160, n_val=40, n_test=40, epochs=1, hybrid_epochs=1, batch_size=16, eval_batch_size=40,
    patch_sizes=(7, 14), extra_patch_models=(("p4", 14, "gcnn"),),
    grid_gevit={"num_channels": 8, "num_heads": 1, **_NO_DROPOUT}, embed_dim=8, embed_hidden=8,
    hybrid_overrides={"gcnn_channels": 4, "gcnn_layers": 2, "gcnn_kernel": 3, "pooled_size": 4},
    vit_overrides={"embed_dim": 16, "hidden_dim": 32, "num_heads": 2, "num_layers": 1},
    posthoc_groups=("C4",), gevit_models=(("p4", 5),), gevit_trained=(("p4", 5),),
    gevit_overrides={"num_channels": 8, "num_heads": 1, "block_sizes": (1,), "crop_per_layer": (0,), **_NO_DROPOUT},
    gevit_n_train=4, gevit_n_eval=4, gevit_speed_batch=2, speed_batch=4, speed_steps=1, speed_budget_s=5.0,
    gevit_published=())
# full trains GE-ViT p4 and p4m (neighbourhood 5) itself, like every other model
_ZOO_MNIST_FULL = ModelZooProfile(
    n_train=None, n_val=None, n_test=None, epochs=50, hybrid_epochs=50, batch_size=64, eval_batch_size=256,
    lr=1e-3, weight_decay=0.01, warmup_fraction=0.2, augment=False,
    patch_sizes=(2, 4, 7, 14), patch_group="p4", extra_patch_models=(("p4m", 4, "mean"), ("p4", 4, "gcnn")),
    hybrid_groups=("p4", "p4m"), grid_gevit={}, embed_dim=None, embed_hidden=64, hybrid_overrides={},
    vit_overrides={}, posthoc_groups=("C4", "C8", "C16"), gevit_models=_ZOO_GEVIT_4,
    gevit_trained=(("p4", 5), ("p4m", 5)), gevit_overrides={}, gevit_n_train=None, gevit_n_eval=None,
    gevit_epochs=50, gevit_speed_batch=16, speed_batch=64, speed_steps=10, speed_budget_s=120.0)

_ZOO_PCAM_FULL = ModelZooProfile(
    # the post's PCam training: batch 256, AdamW 1e-3 (wd 0.01), warm-up 10 of 50 epochs then cosine, random D4;
    # the hybrid 15 epochs
    n_train=None, n_val=None, n_test=None, epochs=50, hybrid_epochs=15, batch_size=256, eval_batch_size=512,
    lr=1e-3, weight_decay=0.01, warmup_fraction=0.2, augment=True,
    patch_sizes=(2, 3, 6, 12, 16), patch_group="p4", extra_patch_models=(("p4m", 6, "mean"), ("p4", 6, "gcnn")),
    # the p4 hybrid with a D4 G-CNN is the post's architecture (136,558 parameters) with exact group convolutions
    hybrid_groups=("p4", "p4m"), grid_gevit={}, embed_dim=None, embed_hidden=None,
    hybrid_overrides={"gcnn_group": "p4m"}, vit_overrides={}, posthoc_groups=("C4", "D4", "C16"),
    gevit_models=_ZOO_GEVIT_4, gevit_trained=(("p4", 5),),
    gevit_overrides={}, gevit_n_train=26214, gevit_n_eval=None, gevit_epochs=5, gevit_speed_batch=8,
    speed_batch=32, speed_steps=10, speed_budget_s=120.0, num_workers=8)
_ZOO_PCAM_QUICK = replace(
    _ZOO_PCAM_FULL, n_train=512, n_val=128, n_test=256, epochs=2, hybrid_epochs=2, batch_size=32, eval_batch_size=64,
    lr=2e-3, patch_sizes=(6, 12, 16), extra_patch_models=(), hybrid_groups=("p4",),
    grid_gevit={"num_channels": 12, "num_heads": 4, **_NO_DROPOUT}, embed_dim=32, embed_hidden=64,
    hybrid_overrides={"gcnn_layers": 4, "pooled_size": 6}, gevit_models=(("p4", 5),), gevit_trained=(),
    gevit_overrides=dict(_NO_DROPOUT), gevit_speed_batch=1, speed_batch=4, speed_steps=2, speed_budget_s=15.0,
    num_workers=0)
_ZOO_PCAM_SMOKE = replace(
    _ZOO_PCAM_QUICK, n_train=64, n_val=16, n_test=16, epochs=1, hybrid_epochs=1, batch_size=8, eval_batch_size=16,
    patch_sizes=(16,), grid_gevit=_ZOO_MNIST_SMOKE.grid_gevit, embed_dim=8, embed_hidden=8,
    hybrid_overrides={"gcnn_channels": 4, "gcnn_layers": 2, "gcnn_kernel": 3, "pooled_size": 4},
    vit_overrides={"embed_dim": 16, "hidden_dim": 32, "num_heads": 2, "num_layers": 1, "patch_size": 16,
                   "num_patches": 36}, posthoc_groups=("C4",), gevit_models=(), gevit_trained=(),
    speed_batch=2, speed_steps=1, speed_budget_s=5.0)

_MODEL_ZOO: dict[str, dict[str, ModelZooProfile]] = {
    "rotmnist": {"smoke": _ZOO_MNIST_SMOKE, "quick": _ZOO_MNIST_QUICK, "full": _ZOO_MNIST_FULL},
    "pcam": {"smoke": _ZOO_PCAM_SMOKE, "quick": _ZOO_PCAM_QUICK, "full": _ZOO_PCAM_FULL},
}


def model_zoo_profile(dataset: str, profile: str, overrides: dict[str, Any] | None = None) -> ModelZooProfile:
    """The model-zoo sizes for ``dataset`` ("rotmnist", "pcam") at ``profile``, with ``overrides`` of any field."""
    return _override(_lookup(_MODEL_ZOO, dataset, profile, "unknown dataset"), overrides, "model-zoo")


# ---- equal compute (notebook 11): every family trained for the same seconds on rotated MNIST ------------------
@dataclass(frozen=True)
class EqualComputeProfile:
    """The equal-compute study (notebook 11): each of ``families`` trains for ``budget_s`` seconds of optimizer
    steps (validation excluded; the last curve point may pass the budget by one chunk) on ``n_train`` rotated-MNIST
    digits (None: all 10,000), AdamW at a constant ``lr`` (a longer budget continues a run without changing its
    past), validating on ``n_val`` digits after every ``chunk`` training images (``gevit_chunk`` for the full-image
    GE-ViTs), then testing on ``n_test`` digits with the best validation weights. Architectures, batch sizes and
    weight decay: the model-zoo profile of the same name; ``patch_size``: the patch-embedding models'."""

    budget_s: float
    chunk: int
    gevit_chunk: int
    n_train: int | None
    n_val: int | None
    n_test: int | None
    lr: float
    patch_size: int
    families: tuple[str, ...]


# quick: 5 families x 180 s of training, plus validation and test: 1,292 s on the 2-core CPU
# Patch 14: the best validation accuracy of notebook 10's quick ablation (43.5%; patch 4: 42.8%, 400 digits).
# Constant 1e-3 as the post's rotated-MNIST recipes (Adam, constant 1e-3; gevit_lib.recipes), with AdamW's decay.
_EQUAL_QUICK = EqualComputeProfile(
    budget_s=180.0, chunk=1000, gevit_chunk=250, n_train=None, n_val=500, n_test=1000, lr=1e-3, patch_size=14,
    families=("vit", "patch_p4", "patch_p4m", "hybrid_p4", "gevit_p4"))
_EQUAL: dict[str, EqualComputeProfile] = {
    "smoke": replace(_EQUAL_QUICK, budget_s=1.0, chunk=32, gevit_chunk=4, n_train=160, n_val=40, n_test=40),
    "quick": _EQUAL_QUICK,
    "full": replace(_EQUAL_QUICK, budget_s=1800.0, chunk=10000, gevit_chunk=1000, n_val=None, n_test=None,
                    families=("vit", "patch_p4", "patch_p4m", "hybrid_p4", "hybrid_p4m", "gevit_p4", "gevit_p4m")),
}


def equal_compute_profile(profile: str, overrides: dict[str, Any] | None = None) -> EqualComputeProfile:
    """The equal-compute study's sizes at ``profile`` ("smoke", "quick", "full"), with ``overrides`` of any field."""
    sizes = _lookup({"the equal-compute study": _EQUAL}, "the equal-compute study", profile, "")
    return _override(sizes, overrides, "equal-compute")


# ---- figures (notebooks 01-05) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureProfile:
    """Sizes of the figure notebooks 01-05: ``Rotation.gif`` frames, latent-GIF transforms, exact symmetries whose
    invariance error notebook 04 measures, attention-GIF digits, and notebook 05's sweep angles (degrees) and test
    digits per class (that many 3s and as many 8s)."""

    rotation_frames: int
    latent_transforms: tuple[str, ...]
    exact_transforms: tuple[str, ...]
    attention_images: int
    sweep_angles: tuple[float, ...]
    sweep_digits: int


_ALL_LATENT = ("original", "rotate 90", "rotate 45", "rotate 20", "mirror", "translate")
_ALL_EXACT = ("rot90", "rot180", "rot270", "flip")
_FIGURES: dict[str, FigureProfile] = {
    "smoke": FigureProfile(rotation_frames=6, latent_transforms=("original", "rotate 90"), exact_transforms=("rot90",),
                           attention_images=5, sweep_angles=(45.0, 90.0), sweep_digits=1),
    "quick": FigureProfile(rotation_frames=72, latent_transforms=_ALL_LATENT, exact_transforms=_ALL_EXACT,
                           attention_images=5, sweep_angles=tuple(float(a) for a in range(0, 360, 15)), sweep_digits=1),
    "full": FigureProfile(rotation_frames=360, latent_transforms=_ALL_LATENT, exact_transforms=_ALL_EXACT,
                          attention_images=5, sweep_angles=tuple(float(a) for a in range(0, 360, 5)), sweep_digits=4),
}


def figure_profile(profile: str) -> FigureProfile:
    """The sizes of the figure notebooks 01-05 at ``profile`` ("smoke", "quick", "full")."""
    return _lookup({"figure notebooks 01-05": _FIGURES}, "figure notebooks 01-05", profile, "")
