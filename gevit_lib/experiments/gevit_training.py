"""Training GE-ViT from scratch on rotated MNIST or PCam with the original repository's settings (SPEC 3.4).

Validation selects the best epoch; the test split is evaluated once at the end. Runs are resumable (``resume=True``
with the same ``run_dir``) and run unchanged under ``torchrun`` (see :mod:`gevit_lib.train`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data import pcam, rotated_mnist
from ..models.gevit import build_gevit
from ..profiles import gevit_training_profile
from ..train import FitResult, TrainConfig, fit, seed_everything
from .posthoc import random_subset, take_subset

__all__ = ["train_gevit"]


def _subset(ds: Any, n: int | None, seed: int) -> Any:
    return take_subset(ds, random_subset(len(ds), n, seed))


def train_gevit(preset: str = "rotmnist", group: str = "p4", patch_size: int = 5, profile: str = "full", *,
                device: str = "auto", data_dir: str | os.PathLike[str] | None = None,
                run_dir: str | os.PathLike[str] | None = None, resume: bool = False, seed: int = 0,
                fraction: float = 1.0, digits: tuple[int, ...] | None = None, precision: str = "auto",
                compile: bool = False, num_workers: int = 0, epochs: int | None = None,
                progress: bool = True) -> FitResult:
    """Train ``build_gevit(preset, group, patch_size)`` on its dataset; ``fraction`` / ``digits`` select the post's
    rotated-MNIST variants (10% of the data; 3 vs 8). ``compile`` wraps the model in ``torch.compile`` (GPU)."""
    settings = gevit_training_profile(preset, profile)
    seed_everything(seed)
    if preset == "rotmnist":
        splits = {s: rotated_mnist(s, root=data_dir, fraction=fraction if s == "train" else 1.0, digits=digits)
                  for s in ("train", "validation", "test")}
    else:
        splits = {s: pcam(s, root=data_dir) for s in ("train", "validation", "test")}
    num_classes = splits["train"].num_classes if hasattr(splits["train"], "num_classes") else None
    model = build_gevit(preset, group, patch_size=patch_size, num_classes=num_classes)
    train_model = torch.compile(model) if compile else model
    config = TrainConfig(epochs=epochs or settings.epochs, batch_size=settings.batch_size,
                         optimizer=settings.optimizer, lr=settings.lr, weight_decay=settings.weight_decay,
                         momentum=settings.momentum, schedule=settings.schedule, warmup_epochs=settings.warmup_epochs,
                         precision=precision, seed=seed, device=device, num_workers=num_workers,
                         early_stopping_patience=settings.early_stopping_patience,
                         label=f"GE-ViT {preset} {group} patch {patch_size} ({profile})")
    run = Path(run_dir) if run_dir is not None else Path("runs") / f"gevit_{preset}_{group}_p{patch_size}" / profile
    return fit(train_model, _subset(splits["train"], settings.n_train, seed),
               _subset(splits["validation"], settings.n_val, seed), config, run_dir=run, resume=resume,
               test_data=splits["test"] if profile == "full" else _subset(splits["test"], settings.n_val, seed),
               progress=progress)
