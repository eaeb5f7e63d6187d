"""The one place that maps a run profile ("smoke" | "quick" | "full") to sizes: subsets, epochs, batches, groups.

- ``smoke``: seconds; tiny subsets, one epoch, 4 rotations (used by the tests).
- ``quick``: a few minutes per experiment on a 2-core CPU: a few thousand test images, a short finetune on a subset.
- ``full``: the post's settings (SPEC sections 4, 5.4, 5.5); meant for a GPU.

Notebooks and experiment functions pass only the profile name; :func:`posthoc_profile` returns the sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["PROFILES", "PostHocProfile", "check_profile", "posthoc_profile", "POSTHOC_EXPERIMENTS",
           "GEViTTrainingProfile", "gevit_training_profile"]

PROFILES: tuple[str, ...] = ("smoke", "quick", "full")
POSTHOC_EXPERIMENTS: tuple[str, ...] = ("rotmnist", "mnist_to_rotmnist", "low_data", "pcam")


def check_profile(profile: str) -> str:
    """``profile`` if it is a known name, else a ValueError listing the valid ones."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


@dataclass(frozen=True)
class PostHocProfile:
    """Sizes of one post-hoc experiment run. ``None`` sizes mean the whole split.

    ``group`` is used by mean / max / sum / most probable / most certain; ``learned_group`` by the two learned
    aggregators and ``tta_group`` by the test-time-augmentation baseline (the original code built those with
    its defaults, 4 rotations + flips = D4, SPEC 5.1). ``epochs`` / ``epochs_attention`` / ``optimizer`` / ``lr``
    / ``batch_size``: finetuning (SPEC 5.4: Adam 5e-4, 25 / 60 epochs, batch 128; PCam 5.5: SGD 1e-3 Nesterov,
    3 epochs, batch 64). ``train_*``: training the ViT itself when the experiment does not start from a
    published checkpoint (SPEC 4; ``train_subset`` caps its training images).
    """

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
    group: str
    learned_group: str
    tta_group: str
    modes: tuple[str, ...]
    train_epochs: int
    train_batch_size: int
    train_lr: float
    train_subset: int | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modes"] = list(self.modes)
        return d


_MNIST_FULL = PostHocProfile(
    n_train=None, n_val=None, n_test=None, epochs=25, epochs_attention=60, batch_size=128, eval_batch_size=128,
    optimizer="adam", lr=5e-4, momentum=0.0, nesterov=False, group="C16", learned_group="D4", tta_group="D4",
    modes=("none", "head", "model"), train_epochs=500, train_batch_size=128, train_lr=1e-3,
    train_subset=None)
_MNIST_QUICK = replace(_MNIST_FULL, n_train=256, n_val=500, n_test=2000, epochs=1, epochs_attention=2,
                       batch_size=64, eval_batch_size=128, modes=("none", "head"), train_epochs=3,
                       train_subset=10000)
_MNIST_SMOKE = replace(_MNIST_FULL, n_train=64, n_val=32, n_test=64, epochs=1, epochs_attention=1, batch_size=32,
                       modes=("none", "head"),
                       eval_batch_size=64, group="C4", train_epochs=1, train_batch_size=32,
                       train_subset=64)

_PCAM_FULL = PostHocProfile(
    n_train=None, n_val=None, n_test=None, epochs=3, epochs_attention=3, batch_size=64, eval_batch_size=128,
    optimizer="sgd", lr=1e-3, momentum=0.9, nesterov=True, group="D4", learned_group="D4", tta_group="D4",
    modes=("none", "head"), train_epochs=50, train_batch_size=128, train_lr=1e-2,
    train_subset=None)
_PCAM_QUICK = replace(_PCAM_FULL, n_train=128, n_val=128, n_test=256, epochs=1, epochs_attention=1, batch_size=32,
                      eval_batch_size=32, train_epochs=1, train_subset=2048)
_PCAM_SMOKE = replace(_PCAM_FULL, n_train=16, n_val=8, n_test=8, epochs=1, epochs_attention=1, batch_size=8,
                      eval_batch_size=8, train_epochs=1, train_batch_size=8,
                      train_subset=16)

_TABLE: dict[str, dict[str, PostHocProfile]] = {
    "rotmnist": {"smoke": _MNIST_SMOKE, "quick": _MNIST_QUICK, "full": _MNIST_FULL},
    "mnist_to_rotmnist": {"smoke": _MNIST_SMOKE, "quick": _MNIST_QUICK,
                          # the post's MNIST ViT: 60k MNIST, no augmentation, batch 1024 (SPEC 4)
                          "full": replace(_MNIST_FULL, train_batch_size=1024)},
    "low_data": {"smoke": _MNIST_SMOKE, "quick": _MNIST_QUICK, "full": _MNIST_FULL},
    "pcam": {"smoke": _PCAM_SMOKE, "quick": _PCAM_QUICK, "full": _PCAM_FULL},
}


def posthoc_profile(experiment: str, profile: str) -> PostHocProfile:
    """Sizes for a post-hoc experiment ("rotmnist", "mnist_to_rotmnist", "low_data", "pcam") at a profile."""
    check_profile(profile)
    if experiment not in _TABLE:
        raise ValueError(f"unknown post-hoc experiment {experiment!r}; choose one of {', '.join(_TABLE)}")
    return _TABLE[experiment][profile]


@dataclass(frozen=True)
class GEViTTrainingProfile:
    """Sizes of a GE-ViT training run (SPEC 3.4: the README commands of the original repository)."""

    n_train: int | None
    n_val: int | None
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    schedule: str
    warmup_epochs: float
    early_stopping_patience: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_GEVIT_ROTMNIST_FULL = GEViTTrainingProfile(n_train=None, n_val=None, epochs=300, batch_size=8, optimizer="adam",
                                            lr=1e-3, weight_decay=1e-4, momentum=0.0, schedule="constant",
                                            warmup_epochs=0.0, early_stopping_patience=None)
_GEVIT_PCAM_FULL = GEViTTrainingProfile(n_train=None, n_val=None, epochs=100, batch_size=16, optimizer="sgd",
                                        lr=1e-2, weight_decay=1e-4, momentum=0.9, schedule="warmup_cosine",
                                        warmup_epochs=10.0, early_stopping_patience=None)
_GEVIT_TRAINING: dict[str, dict[str, GEViTTrainingProfile]] = {
    "rotmnist": {"full": _GEVIT_ROTMNIST_FULL,
                 "quick": replace(_GEVIT_ROTMNIST_FULL, n_train=256, n_val=200, epochs=1),
                 "smoke": replace(_GEVIT_ROTMNIST_FULL, n_train=16, n_val=8, epochs=1)},
    "pcam": {"full": _GEVIT_PCAM_FULL,
             "quick": replace(_GEVIT_PCAM_FULL, n_train=64, n_val=32, epochs=1, warmup_epochs=0.0),
             "smoke": replace(_GEVIT_PCAM_FULL, n_train=8, n_val=4, epochs=1, warmup_epochs=0.0)},
}


def gevit_training_profile(preset: str, profile: str) -> GEViTTrainingProfile:
    """Sizes for training GE-ViT on ``preset``'s dataset ("rotmnist" or "pcam") at a profile."""
    check_profile(profile)
    if preset not in _GEVIT_TRAINING:
        raise ValueError(f"no GE-ViT training settings for preset {preset!r}; choose one of {', '.join(_GEVIT_TRAINING)}")
    return _GEVIT_TRAINING[preset][profile]


# ---- figures (notebooks 01-05) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureProfile:
    """Sizes of the figure notebooks 01-05 at one profile.

    ``rotation_frames``: frames of ``Rotation.gif`` (evenly spaced over 360 degrees); ``latent_transforms``: the
    frames of the latent-representation GIFs; ``exact_transforms``: exact symmetries whose invariance error notebook
    04 measures; ``attention_images``: digits of the attention GIF; ``sweep_angles`` / ``sweep_digits``: angles
    (degrees) of the invariance sweep of notebook 05 and its number of test digits per class (that many 3s and as
    many 8s).
    """

    rotation_frames: int
    latent_transforms: tuple[str, ...]
    exact_transforms: tuple[str, ...]
    attention_images: int
    sweep_angles: tuple[float, ...]
    sweep_digits: int


_ALL_LATENT = ("original", "rotate 90", "rotate 45", "rotate 20", "mirror", "translate")
_FIGURES: dict[str, FigureProfile] = {
    "smoke": FigureProfile(rotation_frames=6, latent_transforms=("original", "rotate 90"),
                           exact_transforms=("rot90",), attention_images=5, sweep_angles=(45.0, 90.0),
                           sweep_digits=1),
    "quick": FigureProfile(rotation_frames=72, latent_transforms=_ALL_LATENT,
                           exact_transforms=("rot90", "rot180", "rot270", "flip"), attention_images=5,
                           sweep_angles=tuple(float(a) for a in range(0, 360, 15)), sweep_digits=1),
    "full": FigureProfile(rotation_frames=360, latent_transforms=_ALL_LATENT,
                          exact_transforms=("rot90", "rot180", "rot270", "flip"), attention_images=5,
                          sweep_angles=tuple(float(a) for a in range(0, 360, 5)), sweep_digits=4),
}
__all__ += ["FigureProfile", "figure_profile"]


def figure_profile(profile: str) -> FigureProfile:
    """The sizes of the figure notebooks 01-05 at ``profile`` ("smoke", "quick", "full")."""
    return _FIGURES[check_profile(profile)]
