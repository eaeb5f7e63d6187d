"""The blog authors' published weights: where they are (public URL, sha256), finding/downloading them, loading them.

``load_published(name)`` returns a ready model (eval mode, CPU). The file is looked for in ``$GEVIT_CHECKPOINT_DIR``,
the data directory (and its ``checkpoints/`` folder), and ``../shared/reference/checkpoints`` beside the repository;
otherwise it is downloaded from the original repository at a fixed commit. The sha256 is always verified.
Converting the original state dicts onto this library's modules is the job of each model module
(``from_original_state_dict``); :func:`load_into` gives the error that names missing and unexpected keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import RemoteFile, data_dir, fetch

__all__ = [
    "PublishedCheckpoint",
    "PUBLISHED",
    "IncompatibleCheckpointError",
    "checkpoint_dirs",
    "checkpoint_file",
    "load_original_state_dict",
    "load_into",
    "load_published",
]

ORIGINAL_REPO = "WouterBant/GEVit-DL2-Project"
ORIGINAL_COMMIT = "1cee23428b19af200e497e81bb47ddf2265482b4"
_RAW = f"https://raw.githubusercontent.com/{ORIGINAL_REPO}/{ORIGINAL_COMMIT}/"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class IncompatibleCheckpointError(RuntimeError):
    """A state dict does not fit the model it is loaded into."""


@dataclass(frozen=True)
class PublishedCheckpoint:
    """One published checkpoint: its file name here, its path in the original repository, sha256, and model config."""

    name: str
    original_path: str
    sha256: str
    kind: str  # "gevit" | "vit" | "hybrid"
    description: str
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    @property
    def url(self) -> str:
        return _RAW + self.original_path

    @property
    def remote(self) -> RemoteFile:
        return RemoteFile(self.filename, self.url, self.sha256, "sha256")


_GEVIT_DIR = "demos/checkpoints/"
PUBLISHED: dict[str, PublishedCheckpoint] = {
    c.name: c
    for c in [
        PublishedCheckpoint(
            "gevit_p4sa_patch5_rotmnist",
            _GEVIT_DIR + "rotMNIST_model_p4sa_type_Local_patch_5_dpatt_0.1_dpval_0.1_activ_Swish_norm_LayerNorm_white_"
            "1.41421356_optim_Adam_lr_0.0005_bs_64_ep_500_wd_0.0001_seed_0_sched_constants_schdec_1.0.pt",
            "cc83edcf57c152ac87c1353cf748593bc1c999aedea99b05e3618c6d326df15b",
            "gevit",
            "GE-ViT p4 (C4), local patch 5, 10 classes, trained on rotated MNIST (used for Rotation.gif)",
            {"preset": "rotmnist", "group": "p4", "patch_size": 5, "num_classes": 10},
        ),
        PublishedCheckpoint(
            "gevit_p4msa_patch5_rotmnist",
            _GEVIT_DIR + "rotMNIST_model_p4msa_type_Local_patch_5_dpatt_0.1_dpval_0.1_activ_Swish_norm_LayerNorm_white_"
            "1.41421356_optim_Adam_lr_0.001_bs_16_ep_50_wd_0.0001_seed_0_sched_constants_schdec_1.0.pt",
            "e6e77e753f89df83dcfc676015600aa49ebdb8c21808723feaa7ee177280adb5",
            "gevit",
            "GE-ViT p4m (D4), local patch 5, 2 classes (digit 3 -> 0, 8 -> 1), rotated MNIST; trained with the "
            "original (non-equivariant) group-embedding table, so it needs group_index='reference'",
            {"preset": "rotmnist", "group": "p4m", "patch_size": 5, "num_classes": 2, "group_index": "reference"},
        ),
        PublishedCheckpoint(
            "vit_rotmnist",
            "src/post_hoc_equivariance/checkpoints/rotmnist/normal_vit.pt",
            "36c83de78c91472574ca140b24eb9c50b01a6940599b12b262fdd71f1ed09945",
            "vit",
            "plain ViT trained on rotated MNIST (post-hoc experiment 1)",
            {"preset": "mnist"},
        ),
        PublishedCheckpoint(
            "vit_mnist",
            "src/post_hoc_equivariance/checkpoints/train_mnist/normal_vit.pt",
            "b9f2f9e0ebfde47d7a187f6c27ca511dfd97f95f6089873ae18825c41e71e5db",
            "vit",
            "plain ViT trained on upright MNIST (post-hoc experiment 2)",
            {"preset": "mnist"},
        ),
        PublishedCheckpoint(
            "vit_rotmnist_10pct",
            "src/post_hoc_equivariance/checkpoints/less_data_rotmnist/normal_vit.pt",
            "4b0e26ca75d7f758859f2937c38928e64d7f88ad23ba1cd47da1af4ae767ab37",
            "vit",
            "plain ViT trained on 10% of rotated MNIST (post-hoc experiment 3)",
            {"preset": "mnist"},
        ),
        PublishedCheckpoint(
            "modern_eq_vit",
            "src/modern_eq_vit/saved/modern_eq_vit.pt",
            "7c00bedf323927da72b593e8333219daa7c650894d062a9167f0e580d79044b8",
            "hybrid",
            "hybrid G-CNN -> GE-ViT on PCam (15 epochs); its G-CNN is not equivariant beyond the lifting layer",
            {},
        ),
        PublishedCheckpoint(
            "modern_eq_vit_finetuned",
            "src/modern_eq_vit/saved/modern_eq_vit_finetuned.pt",
            "a68538e49ee6eb4fb845d96f9da11069551dd27427b2403e902bb9ea37073ebb",
            "hybrid",
            "the hybrid after 2 more epochs",
            {},
        ),
    ]
}


def _shared_dir() -> Path:
    return Path(os.environ.get("GEVIT_SHARED_DIR", _REPO_ROOT.parent / "shared"))


def checkpoint_dirs() -> list[Path]:
    """Folders searched for checkpoint files, in order; the first one is where downloads go."""
    dirs: list[Path] = []
    env = os.environ.get("GEVIT_CHECKPOINT_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    base = data_dir()
    dirs += [base / "checkpoints", base, _shared_dir() / "reference" / "checkpoints"]
    return dirs


def _entry(name: str) -> PublishedCheckpoint:
    if name not in PUBLISHED:
        raise KeyError(f"unknown published checkpoint {name!r}; known: {', '.join(PUBLISHED)}")
    return PUBLISHED[name]


def checkpoint_file(name: str, download: bool = True) -> Path:
    """Local, sha256-verified path of a published checkpoint (downloaded into the first search folder if absent)."""
    dirs = checkpoint_dirs()
    return fetch(_entry(name).remote, dirs[0], search=dirs[1:], download=download)


def load_original_state_dict(name: str, download: bool = True) -> dict[str, torch.Tensor]:
    """The published state dict on CPU, with the ``module.`` prefix of ``DataParallel`` removed."""
    state = torch.load(checkpoint_file(name, download), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and not isinstance(state["state_dict"], torch.Tensor):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """``load_state_dict(strict=True)`` with an error that names every missing and unexpected key and shape clash."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    clashes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
               if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or clashes:
        raise IncompatibleCheckpointError(
            f"{source} does not fit {type(model).__name__}:\n  missing keys: {missing}\n"
            f"  unexpected keys: {unexpected}\n  shape mismatches: {clashes}"
        )
    model.load_state_dict(dict(state), strict=True)
    return model


def load_published(name: str, download: bool = True, **options: Any) -> nn.Module:
    """A ready model (eval mode, CPU) built from a published checkpoint; ``options`` go to the model builder."""
    entry = _entry(name)
    state = load_original_state_dict(name, download)
    if entry.kind == "gevit":
        from .models.gevit import from_original_state_dict
    elif entry.kind == "vit":
        from .models.vit import from_original_state_dict  # type: ignore[no-redef]
    elif entry.kind == "hybrid":
        from .models.hybrid import from_original_state_dict  # type: ignore[no-redef]
    else:  # pragma: no cover - registry is static
        raise AssertionError(entry.kind)
    model = from_original_state_dict(state, **{**entry.config, **options})
    model.eval()
    model.published_name = name  # type: ignore[attr-defined]
    return model
