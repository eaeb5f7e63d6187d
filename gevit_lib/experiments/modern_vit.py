"""Faster equivariant ViTs (SPEC 6, 7.6, 8.5, 8.6): the speed / size / accuracy table and the patch-size ablation.

- :func:`model_zoo`: trains and measures, on one dataset and profile, the plain ViT, the post-hoc ViT (mean pooling
  over T = 4, 8, 16 transforms), GE-ViT (p4 / p4m, neighbourhood 5 / 9), the invariant patch-embedding models
  (:class:`~gevit_lib.models.hybrid.PatchGEViT`, one per patch size, plus p4m and G-CNN-embedding variants) and
  the hybrid G-CNN -> GE-ViT (:class:`~gevit_lib.models.hybrid.HybridGEViT`). Per model: parameters, training and
  inference images/s and peak memory on every speed device (CPU, and the GPU when there is one), epoch time, and
  the validation / test accuracy reached in the profile (best validation epoch, test evaluated once). Writes
  ``model_zoo.{csv,md,json}`` and the ablation plot ``ablation.png`` (accuracy against epoch time per patch size;
  it replaces the post's hand-typed ablation.png) into ``out_dir``.
- :func:`patch_size_ablation`: only the patch-embedding models of the ablation and the GE-ViT reference speed
  (``ablation.{csv,md,json}``, ``ablation.png``): the post's PCam ablation at ``full`` (patch 2, 3, 6, 12, 16).

Every time is measured in the run that writes it. Throughput: ``measure_speed`` on a fresh copy of the model
(random inputs of the dataset's shape, a warm-up on one image, then up to ``speed_steps`` timed batches of
``speed_batch``; training = forward + backward + Adam step). A model whose batches exceed the profile's per-model
budget gets fewer timed batches (at least one), and training is not timed when one step would take longer than the
budget (the note says so). Peak memory: ``torch.cuda.max_memory_allocated`` on GPUs; on CPU the increase of the
bytes in use by the C allocator (glibc ``mallinfo2``) during the timed training steps, sampled every millisecond.
Epoch time: the mean wall time of one ``fit`` epoch on the training device (training pass + validation pass).

Quick profile on CPU: GE-ViT on the full 28x28 image is far too slow to train here (seconds per image); its p4,
neighbourhood 5 row reports the accuracy of the authors' published checkpoint on this run's images (trained on a
few images only when that file is unavailable), the other GE-ViT rows are measured for speed only; the table says
so. ``full`` trains GE-ViT p4 and p4m (neighbourhood 5) like every other model. The sizes of every profile are
in :data:`PROFILES` (this module's own table; :mod:`gevit_lib.profiles` holds the post-hoc sizes).
GE-ViT-based models use attention dropout 0 in ``smoke`` / ``quick`` (``grid_gevit`` / ``gevit_overrides``), the
post's 0.1 in ``full``.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from gevit_lib import __version__
from gevit_lib.profiles import check_profile

__all__ = [
    "DATASETS",
    "ModernViTProfile",
    "PROFILES",
    "modern_vit_profile",
    "ModelSpec",
    "ZooResult",
    "model_specs",
    "select_models",
    "measure_speed",
    "posthoc_mean",
    "model_zoo",
    "patch_size_ablation",
    "plot_ablation",
]

DATASETS: tuple[str, ...] = ("rotmnist", "pcam")
_INPUT = {"rotmnist": ((1, 28, 28), 10), "pcam": ((3, 96, 96), 2)}


@dataclass(frozen=True)
class ModernViTProfile:
    """Sizes of one run. ``None`` sizes mean the whole split.

    Training (every trained model, one ``TrainConfig``): ``epochs`` (``hybrid_epochs`` for the hybrid,
    ``gevit_epochs`` for the full-image GE-ViT baselines), ``batch_size``, AdamW with ``lr`` / ``weight_decay``,
    linear warm-up for ``warmup_fraction`` of the epochs then cosine (the post: 10 of 50 epochs), random 90-degree
    rotations and flips when ``augment`` (the post's PCam training). ``patch_sizes``: the ablation
    (:class:`PatchGEViT` with ``patch_group`` and the mean embedding); ``extra_patch_models``: more (group, patch
    size, embed method) rows for the table; ``hybrid_groups``: one hybrid per group. ``grid_gevit``: GE-ViT options
    of the patch / hybrid back ends; ``embed_dim``: patch embedding width (None: preset); ``embed_hidden``: hidden
    width of the shared patch MLP of the mean embedding (None: one Linear layer, the post's design, which only sees
    the group-invariant linear projections of a patch -- for 2x2 patches under C4 just their mean).
    ``posthoc_groups``: the post-hoc ViT rows (mean pooling, no finetuning). ``gevit_models``: the full-image
    GE-ViT rows (group, local neighbourhood); those in ``gevit_trained`` are trained on ``gevit_n_train`` images
    (None: ``n_train``) and evaluated on ``gevit_n_eval`` validation and test images (None: ``n_val`` /
    ``n_test``); ``gevit_overrides`` change their architecture (smoke: narrow). Speed: ``speed_batch`` images per
    batch (``gevit_speed_batch`` for the full-image GE-ViTs), ``speed_steps`` timed batches, ``speed_budget_s``
    seconds per model and mode (None: no limit). ``num_workers``: data-loader processes (PCam is read lazily).
    ``gevit_published``: (group, neighbourhood, checkpoint) of full-image GE-ViT rows whose accuracy comes from the
    authors' published checkpoint (evaluated on ``gevit_n_eval`` images) instead of a training run here; when the
    checkpoint cannot be found or downloaded the row falls back to ``gevit_trained`` (and says so).
    """

    n_train: int | None
    n_val: int | None
    n_test: int | None
    epochs: int
    hybrid_epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    augment: bool
    patch_sizes: tuple[int, ...]
    patch_group: str
    extra_patch_models: tuple[tuple[str, int, str], ...]
    hybrid_groups: tuple[str, ...]
    grid_gevit: dict[str, Any]
    embed_dim: int | None
    embed_hidden: int | None
    hybrid_overrides: dict[str, Any]
    vit_overrides: dict[str, Any]
    posthoc_groups: tuple[str, ...]
    gevit_models: tuple[tuple[str, int], ...]
    gevit_trained: tuple[tuple[str, int], ...]
    gevit_overrides: dict[str, Any]
    gevit_n_train: int | None
    gevit_n_eval: int | None
    gevit_epochs: int
    gevit_speed_batch: int
    speed_batch: int
    speed_steps: int
    speed_budget_s: float | None
    num_workers: int = 0
    gevit_published: tuple[tuple[str, int, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_NO_DROPOUT = {"attention_dropout": 0.0, "value_dropout": 0.0}
_GEVIT_4 = (("p4", 5), ("p4", 9), ("p4m", 5), ("p4m", 9))
# the authors' GE-ViT p4, patch 5, rotated MNIST (10 classes; a ~83% model, SPEC addendum)
_PUBLISHED_ROTMNIST = (("p4", 5, "gevit_p4sa_patch5_rotmnist"),)

# quick: 8,000 training samples per model (2,000 images x 4 epochs), ~9 min on 2 idle cores; the full-image GE-ViT
# p4, P=5 row takes its accuracy from the published checkpoint (200 validation / test images)
_MNIST_QUICK = ModernViTProfile(
    n_train=2000, n_val=400, n_test=1000, epochs=4, hybrid_epochs=4, batch_size=32, eval_batch_size=100,
    lr=3e-3, weight_decay=0.01, warmup_fraction=0.2, augment=False,
    patch_sizes=(2, 4, 7, 14), patch_group="p4", extra_patch_models=(("p4m", 14, "mean"), ("p4", 7, "gcnn")),
    hybrid_groups=("p4",), grid_gevit={"num_channels": 12, "num_heads": 4, **_NO_DROPOUT}, embed_dim=32,
    embed_hidden=64, hybrid_overrides={}, vit_overrides={}, posthoc_groups=("C4", "C8", "C16"),
    gevit_models=_GEVIT_4, gevit_trained=(("p4", 5),), gevit_overrides=dict(_NO_DROPOUT), gevit_n_train=16,
    gevit_n_eval=200, gevit_epochs=1, gevit_speed_batch=1, speed_batch=16, speed_steps=3, speed_budget_s=8.0,
    gevit_published=_PUBLISHED_ROTMNIST)
_MNIST_SMOKE = replace(
    _MNIST_QUICK, n_train=160, n_val=40, n_test=40, epochs=1, hybrid_epochs=1, batch_size=16, eval_batch_size=40,
    patch_sizes=(7, 14), extra_patch_models=(("p4", 14, "gcnn"),),
    grid_gevit={"num_channels": 8, "num_heads": 1, **_NO_DROPOUT}, embed_dim=8, embed_hidden=8,
    hybrid_overrides={"gcnn_channels": 4, "gcnn_layers": 2, "gcnn_kernel": 3, "pooled_size": 4},
    vit_overrides={"embed_dim": 16, "hidden_dim": 32, "num_heads": 2, "num_layers": 1},
    posthoc_groups=("C4",), gevit_models=(("p4", 5),), gevit_trained=(("p4", 5),),
    gevit_overrides={"num_channels": 8, "num_heads": 1, "block_sizes": (1,), "crop_per_layer": (0,), **_NO_DROPOUT},
    gevit_n_train=4, gevit_n_eval=4, gevit_speed_batch=2, speed_batch=4, speed_steps=1, speed_budget_s=5.0,
    gevit_published=())
_MNIST_FULL = ModernViTProfile(
    n_train=None, n_val=None, n_test=None, epochs=50, hybrid_epochs=50, batch_size=64, eval_batch_size=256,
    lr=1e-3, weight_decay=0.01, warmup_fraction=0.2, augment=False,
    patch_sizes=(2, 4, 7, 14), patch_group="p4", extra_patch_models=(("p4m", 4, "mean"), ("p4", 4, "gcnn")),
    hybrid_groups=("p4", "p4m"), grid_gevit={}, embed_dim=None, embed_hidden=64, hybrid_overrides={},
    vit_overrides={}, posthoc_groups=("C4", "C8", "C16"), gevit_models=_GEVIT_4, gevit_trained=(("p4", 5), ("p4m", 5)),
    gevit_overrides={}, gevit_n_train=None, gevit_n_eval=None, gevit_epochs=50, gevit_speed_batch=16,
    speed_batch=64, speed_steps=10, speed_budget_s=120.0)

_PCAM_FULL = ModernViTProfile(
    # SPEC 6.1 / 6.2: batch 256, AdamW 1e-3 (wd 0.01), warm-up 10 of 50 epochs then cosine, random D4; hybrid 15
    n_train=None, n_val=None, n_test=None, epochs=50, hybrid_epochs=15, batch_size=256, eval_batch_size=512,
    lr=1e-3, weight_decay=0.01, warmup_fraction=0.2, augment=True,
    patch_sizes=(2, 3, 6, 12, 16), patch_group="p4", extra_patch_models=(("p4m", 6, "mean"), ("p4", 6, "gcnn")),
    # the p4 hybrid with a D4 G-CNN is the post's architecture (136,558 parameters) with exact group convolutions
    hybrid_groups=("p4", "p4m"), grid_gevit={}, embed_dim=None, embed_hidden=None,
    hybrid_overrides={"gcnn_group": "p4m"}, vit_overrides={}, posthoc_groups=("C4", "D4", "C16"),
    gevit_models=_GEVIT_4, gevit_trained=(("p4", 5),),
    gevit_overrides={}, gevit_n_train=26214, gevit_n_eval=None, gevit_epochs=5, gevit_speed_batch=8,
    speed_batch=32, speed_steps=10, speed_budget_s=120.0, num_workers=8)
_PCAM_QUICK = replace(
    _PCAM_FULL, n_train=512, n_val=128, n_test=256, epochs=2, hybrid_epochs=2, batch_size=32, eval_batch_size=64,
    lr=2e-3, patch_sizes=(6, 12, 16), extra_patch_models=(), hybrid_groups=("p4",),
    grid_gevit={"num_channels": 12, "num_heads": 4, **_NO_DROPOUT}, embed_dim=32, embed_hidden=64,
    hybrid_overrides={"gcnn_layers": 4, "pooled_size": 6}, gevit_models=(("p4", 5),), gevit_trained=(),
    gevit_overrides=dict(_NO_DROPOUT), gevit_speed_batch=1, speed_batch=4, speed_steps=2, speed_budget_s=15.0,
    num_workers=0)
_PCAM_SMOKE = replace(
    _PCAM_QUICK, n_train=64, n_val=16, n_test=16, epochs=1, hybrid_epochs=1, batch_size=8, eval_batch_size=16,
    patch_sizes=(16,), grid_gevit=_MNIST_SMOKE.grid_gevit, embed_dim=8, embed_hidden=8,
    hybrid_overrides={"gcnn_channels": 4, "gcnn_layers": 2, "gcnn_kernel": 3, "pooled_size": 4},
    vit_overrides={"embed_dim": 16, "hidden_dim": 32, "num_heads": 2, "num_layers": 1, "patch_size": 16,
                   "num_patches": 36}, posthoc_groups=("C4",), gevit_models=(), gevit_trained=(),
    speed_batch=2, speed_steps=1, speed_budget_s=5.0)

PROFILES: dict[str, dict[str, ModernViTProfile]] = {
    "rotmnist": {"smoke": _MNIST_SMOKE, "quick": _MNIST_QUICK, "full": _MNIST_FULL},
    "pcam": {"smoke": _PCAM_SMOKE, "quick": _PCAM_QUICK, "full": _PCAM_FULL},
}


def modern_vit_profile(dataset: str, profile: str, overrides: dict[str, Any] | None = None) -> ModernViTProfile:
    """The sizes for ``dataset`` ("rotmnist", "pcam") at ``profile``, with ``overrides`` of any field."""
    check_profile(profile)
    if dataset not in PROFILES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    prof = PROFILES[dataset][profile]
    if overrides:
        known = set(ModernViTProfile.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown profile field(s) {unknown}; known: {sorted(known)}")
        prof = replace(prof, **overrides)
    return prof


# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """One row of the table: how to build the model and how it is trained.

    ``family``: "vit", "posthoc" (wraps the trained ViT; not trained itself), "gevit", "patch", "hybrid".
    ``train``: "profile" (the profile's sizes), "subset" (GE-ViT baselines: ``gevit_n_train`` images), "none".
    ``published``: a published checkpoint of the same architecture whose accuracy the row reports when available.
    """

    key: str
    name: str
    family: str
    group: str | None
    invariance: str
    build: Callable[[], nn.Module] = field(repr=False, compare=False)
    train: str = "profile"
    patch_size: int | None = None
    epochs: int = 1
    published: str | None = None


def _invariance(group: str | None) -> str:
    return {None: "none", "p4": "exact: rot90", "C4": "exact: rot90", "p4m": "exact: rot90, flips",
            "D4": "exact: rot90, flips", "C8": "exact: rot90; approx. 45 deg",
            "C16": "exact: rot90; approx. 22.5 deg"}.get(group, group or "none")


def model_specs(dataset: str, prof: ModernViTProfile) -> list[ModelSpec]:
    """Every model of the table, in table order (the post-hoc rows are built from the trained ViT later)."""
    from gevit_lib.models.gevit import build_gevit
    from gevit_lib.models.hybrid import build_hybrid, build_patch_gevit
    from gevit_lib.models.vit import build_vit

    preset_vit = "mnist" if dataset == "rotmnist" else "pcam"
    specs = [ModelSpec("vit", "ViT", "vit", None, _invariance(None),
                       lambda: build_vit(preset_vit, **prof.vit_overrides), epochs=prof.epochs)]
    for grp in prof.posthoc_groups:
        specs.append(ModelSpec(f"posthoc_mean_{grp}", f"ViT + post-hoc mean ({grp}, T={_order(grp)})", "posthoc",
                               grp, _invariance(grp), _unbuildable, train="none"))
    trained = set(prof.gevit_trained)
    published = {(grp, hood): name for grp, hood, name in prof.gevit_published}
    for grp, hood in prof.gevit_models:
        specs.append(ModelSpec(
            f"gevit_{grp}_P{hood}", f"GE-ViT {grp}, P={hood}", "gevit", grp, _invariance(grp),
            _builder(build_gevit, dataset, grp, patch_size=hood, group_index="corrected", **prof.gevit_overrides),
            train="subset" if (grp, hood) in trained else "none", epochs=prof.gevit_epochs,
            published=published.get((grp, hood))))
    patch_rows = [(prof.patch_group, p, "mean") for p in prof.patch_sizes]
    patch_rows += [r for r in prof.extra_patch_models if r not in patch_rows]
    embed: dict[str, Any] = {"embed_hidden": prof.embed_hidden}
    if prof.embed_dim is not None:
        embed["embed_dim"] = prof.embed_dim
    for grp, p, method in patch_rows:
        label = "mean" if method == "mean" else "G-CNN"
        specs.append(ModelSpec(
            f"patch_{grp}_p{p}_{method}", f"Patch GE-ViT {grp}, patch {p} ({label} embedding)", "patch", grp,
            _invariance(grp),
            _builder(build_patch_gevit, dataset, grp, patch_size=p, embed_method=method, gevit=prof.grid_gevit,
                     **embed),
            patch_size=p, epochs=prof.epochs))
    for grp in prof.hybrid_groups:
        specs.append(ModelSpec(
            f"hybrid_{grp}", f"Hybrid G-CNN -> GE-ViT {grp}", "hybrid", grp, _invariance(grp),
            _builder(build_hybrid, dataset, grp, gevit=prof.grid_gevit, **prof.hybrid_overrides),
            epochs=prof.hybrid_epochs))
    return specs


def select_models(specs: Sequence[ModelSpec], keys: Sequence[str] | None) -> list[ModelSpec]:
    """The specs named by ``keys`` (all when None), in table order; post-hoc rows bring the ViT row."""
    if keys is None:
        return list(specs)
    known = [s.key for s in specs]
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; this profile has {known}")
    wanted = set(keys)
    if any(s.family == "posthoc" and s.key in wanted for s in specs):
        wanted.add("vit")
    return [s for s in specs if s.key in wanted]


def _order(group: str) -> int:
    from gevit_lib.groups import get_group

    return len(get_group(group))


def _unbuildable() -> nn.Module:
    raise RuntimeError("post-hoc rows wrap the trained ViT; they are built by model_zoo")


def _builder(fn: Callable[..., nn.Module], dataset: str, group: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return fn(dataset, group, **kwargs)

    return build


# ---------------------------------------------------------------------------------------------------------------
# Speed and memory


class _PeakMemory:
    """Peak memory of a block above its start: CUDA ``max_memory_allocated``, or on CPU the bytes in use by the C
    allocator (glibc ``mallinfo2``: what tensors hold, not memory the allocator keeps for reuse), sampled every
    millisecond by a background thread; without glibc the process's resident set size is sampled instead."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe = _cpu_memory_probe()
        self._base = 0
        self._max = 0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._max = self._probe()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._probe())
            self._stop.wait(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._max = max(self._max, self._probe())
            self.peak_bytes = self._max - self._base


def _cpu_memory_probe() -> Callable[[], int]:
    """Bytes in use by glibc malloc (``mallinfo2``: ``uordblks + hblkhd``), else the resident set size."""
    import ctypes
    import ctypes.util

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
        mallinfo2.restype = _MallInfo2
        mallinfo2()
    except (OSError, AttributeError):
        return _rss_bytes

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(model: nn.Module, input_shape: Sequence[int], num_classes: int, device: str | torch.device,
                  batch_size: int, steps: int = 3, budget_s: float | None = None, train: bool = True,
                  seed: int = 0) -> dict[str, Any]:
    """Inference and training images/s and training peak memory of ``model`` on ``device`` (random inputs).

    Works on a deep copy (the model's weights are untouched). A warm-up on one image (pays one-time costs: lazy
    initialisation, caches, kernel selection), then up to ``steps`` timed batches of ``batch_size``: at least one,
    and no further batch once ``budget_s`` would be exceeded. Training (forward, cross-entropy, backward, Adam step)
    is not timed when one step is expected (3 x one inference batch) to exceed ``budget_s``. Returns
    ``infer_img_s``, ``train_img_s`` (None when not timed), ``peak_mem_mib`` (during training; during inference
    when training was not timed), ``timed_batches`` (inference, training) and ``note``.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=gen).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    m = copy.deepcopy(model).to(dev)
    notes: list[str] = []

    def timed(step: Callable[[Tensor, Tensor], None]) -> tuple[float, int]:
        step(x[:1], y[:1])  # warm-up
        times: list[float] = []
        while len(times) < steps:
            if budget_s is not None and times and sum(times) * (len(times) + 1) / len(times) > budget_s:
                break
            _sync(dev)
            t0 = time.perf_counter()
            step(x, y)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        return sum(times), len(times)

    def infer_step(xb: Tensor, yb: Tensor) -> None:
        with torch.no_grad():
            m(xb)

    m.eval()
    with _PeakMemory(dev) as mem_infer:
        infer_s, n_infer = timed(infer_step)
    result: dict[str, Any] = {"infer_img_s": batch_size * n_infer / infer_s, "train_img_s": None,
                              "peak_mem_mib": None, "timed_batches": [n_infer, 0]}
    estimate = 3 * infer_s / n_infer
    if train and budget_s is not None and estimate > budget_s:
        notes.append(f"training not timed (one step ~{estimate:.0f} s > budget {budget_s:g} s)")
        train = False
    if train and any(p.requires_grad for p in m.parameters()):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        loss_fn = nn.CrossEntropyLoss()

        def train_step(xb: Tensor, yb: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(m(xb), yb).backward()
            opt.step()

        m.train()
        with _PeakMemory(dev) as mem_train:
            train_s, n_train = timed(train_step)
        result["train_img_s"] = batch_size * n_train / train_s
        result["timed_batches"][1] = n_train
        result["peak_mem_mib"] = (mem_train.peak_bytes or 0) / 2**20
    else:
        result["peak_mem_mib"] = (mem_infer.peak_bytes or 0) / 2**20
        if train:
            notes.append("no trainable parameters")
    result["note"] = "; ".join(notes)
    del m
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _speed_devices(devices: Sequence[str] | None) -> list[str]:
    if devices is not None:
        return list(devices)
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------------------------
# Data


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset | tuple[Tensor, Tensor]:
    """A seeded random subset (sorted) of ``n`` items; in-memory datasets become tensors."""
    from .posthoc import random_subset, take_subset

    return take_subset(ds, random_subset(len(ds), n, seed))  # type: ignore[arg-type]


def _head(data: Dataset | tuple[Tensor, Tensor], n: int | None) -> Dataset | tuple[Tensor, Tensor]:
    """The first ``n`` items of a subset (the GE-ViT baselines' smaller sets)."""
    if n is None or n >= _size(data):
        return data
    if isinstance(data, tuple):
        return data[0][:n], data[1][:n]
    return Subset(data, list(range(n)))


def _size(data: Dataset | tuple[Tensor, Tensor]) -> int:
    return len(data[1]) if isinstance(data, tuple) else len(data)  # type: ignore[arg-type]


def _load_data(dataset: str, prof: ModernViTProfile, data_dir: str | os.PathLike[str] | None,
               seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from gevit_lib.data import pcam, rotated_mnist

    if dataset == "rotmnist":
        splits = {s: rotated_mnist(s, root=data_dir) for s in ("train", "validation", "test")}
    else:
        splits = {s: pcam(s, root=data_dir) for s in ("train", "validation", "test")}
    sizes = {"train": prof.n_train, "validation": prof.n_val, "test": prof.n_test}
    data = {s: _subset(ds, sizes[s], seed + i) for i, (s, ds) in enumerate(splits.items())}
    desc = splits["test"].describe()
    info = {"data_source": f"{desc.get('dataset')} [{desc.get('source')}: {desc.get('label', desc.get('dataset'))}]",
            "n_train": _size(data["train"]), "n_val": _size(data["validation"]), "n_test": _size(data["test"]),
            "split_checksums": {s: ds.describe().get("checksum") for s, ds in splits.items()}}
    return data, info


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class ZooResult:
    """Rows of the table (one per model), metadata, and the files written."""

    dataset: str
    profile: str
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    def row(self, key: str) -> dict[str, Any]:
        for r in self.rows:
            if r["key"] == key:
                return r
        raise KeyError(f"no row {key!r}; rows: {[r['key'] for r in self.rows]}")

    def markdown(self) -> str:
        """The written markdown table (with its provenance line)."""
        md = next((p for p in self.files if p.suffix == ".md"), None)
        if md is None:
            raise FileNotFoundError("this result has not been written (no markdown table among its files)")
        return md.read_text()

    def best(self, family: str = "patch", accuracy: str = "val_acc") -> dict[str, Any] | None:
        """The row of ``family`` with the highest ``accuracy`` (validation by default: selection never uses test)."""
        rows = [r for r in self.rows if r["family"] == family and r.get(accuracy) is not None]
        return max(rows, key=lambda r: r[accuracy]) if rows else None

    def comparison(self, reference: str = "gevit_p4_P5", family: str = "patch",
                   device: str = "cpu") -> dict[str, Any] | None:
        """The best ``family`` model (by validation accuracy) against ``reference``: accuracies and speed-ups.

        Returns None when either row lacks what is needed (no accuracy, speed not timed)."""
        best = self.best(family)
        try:
            ref = self.row(reference)
        except KeyError:
            return None
        if best is None:
            return None
        return {"model": best["key"], "name": best["name"], "reference": reference, "reference_name": ref["name"],
                "val_acc": best["val_acc"], "test_acc": best["test_acc"], "reference_val_acc": ref.get("val_acc"),
                "reference_test_acc": ref.get("test_acc"), "reference_note": ref.get("note", ""),
                "train_speedup": self.speedup(best["key"], reference, device, "train"),
                "infer_speedup": self.speedup(best["key"], reference, device, "infer"), "device": device}

    def speedup(self, key: str, reference: str, device: str = "cpu", mode: str = "train") -> float | None:
        """Ratio of images/s of ``key`` over ``reference`` on ``device`` ("train" or "infer")."""
        a, b = self.row(key).get(f"{mode}_img_s_{device}"), self.row(reference).get(f"{mode}_img_s_{device}")
        return a / b if a and b else None


def _train_config(prof: ModernViTProfile, epochs: int, device: str, seed: int, label: str) -> Any:
    from gevit_lib.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=prof.batch_size, optimizer="adamw", lr=prof.lr,
                       weight_decay=prof.weight_decay, schedule="warmup_cosine",
                       warmup_epochs=prof.warmup_fraction * epochs, seed=seed, device=device,
                       eval_batch_size=prof.eval_batch_size, num_workers=prof.num_workers, label=label)


def _percent(metrics: dict[str, float] | None) -> float | None:
    return None if metrics is None else 100.0 * metrics["accuracy"]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _columns(devices: Sequence[str]) -> list[str]:
    cols = ["name", "invariance", "params"]
    for d in devices:
        cols += [f"train_img_s_{d}", f"infer_img_s_{d}", f"peak_mem_mib_{d}"]
    return cols + ["epoch_s", "n_train", "epochs", "val_acc", "test_acc", "note"]


def posthoc_mean(backbone: nn.Module, group: str, **kwargs: Any) -> nn.Module:
    """Mean-pooling post-hoc wrapper; copies at a + 90k degrees are exact rot90s (exactly rot90-invariant)."""
    from gevit_lib.posthoc import PostHoc

    return PostHoc(backbone, "mean", group, subgroup_exact=True, **kwargs)


@torch.no_grad()
def _posthoc_accuracy(vit: nn.Module, group: str, groups: Sequence[str], data: Dataset | tuple[Tensor, Tensor],
                      batch_size: int, device: str, cache: dict[tuple[str, str], tuple[Tensor, Tensor]],
                      split: str) -> float:
    """Accuracy (%) of the mean post-hoc wrapper of the frozen ``vit`` on ``data``.

    The embeddings of the copies are computed once for the largest cyclic group C_m of ``groups``; a C_n with n | m
    uses every (m/n)-th copy, which is the same image (same angle, same sampling), so the numbers equal running each
    wrapper separately.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from gevit_lib.groups import get_group

    g = get_group(group)
    cyclic = [get_group(n) for n in groups if not get_group(n).mirror]
    big = max(cyclic, key=len) if cyclic else g
    source = big if not g.mirror and len(big) % len(g) == 0 else g
    key = (source.name, split)
    if key not in cache:
        wrapper = posthoc_mean(vit, source.name).eval().to(device)
        dataset = TensorDataset(*data) if isinstance(data, tuple) else data
        embs, labels = [], []
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            embs.append(wrapper.transformed_embeddings(x.to(device)).float().cpu())
            labels.append(y)
        cache[key] = (torch.cat(embs), torch.cat(labels))
    emb, labels = cache[key]
    emb = emb[:, ::len(source) // len(g)]
    wrapper = posthoc_mean(vit, g.name).eval().to(device)
    logits = torch.cat([wrapper.aggregate(e.to(device)).cpu() for e in emb.split(batch_size)])
    return 100.0 * (logits.argmax(-1) == labels).double().mean().item()


def _published_accuracy(name: str, data: dict[str, Any], prof: ModernViTProfile,
                        device: str) -> dict[str, Any] | None:
    """Validation / test accuracy (%) of a published checkpoint on the first ``gevit_n_eval`` images of the
    profile's splits, or None (with a printed reason) when the checkpoint cannot be found or downloaded."""
    from gevit_lib.checkpoints import load_published
    from gevit_lib.files import MissingFileError
    from gevit_lib.train import evaluate

    try:
        model = load_published(name)
    except MissingFileError as exc:  # absent and not downloadable; a corrupt file (ChecksumError) still raises
        print(f"[modern_vit] {name} not available ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
              "training the row on a subset instead", flush=True)
        return None
    val, test = _head(data["validation"], prof.gevit_n_eval), _head(data["test"], prof.gevit_n_eval)
    accs = [_percent(evaluate(model, split, batch_size=prof.eval_batch_size, device=device)) for split in (val, test)]
    return {"row": {"n_train": None, "epochs": None, "val_acc": accs[0], "test_acc": accs[1],
                    "checkpoint": name},
            "note": f"accuracy of the published checkpoint {name} (trained by the post's authors, not in this run) "
                    f"on {_size(val)} / {_size(test)} validation / test images of this run's data"}


def _run_models(dataset: str, prof: ModernViTProfile, specs: Sequence[ModelSpec], device: str,
                data_dir: str | os.PathLike[str] | None, out: Path, seed: int, devices: list[str],
                progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from gevit_lib.train import fit, resolve_device, seed_everything

    input_shape, num_classes = _INPUT[dataset]
    data, info = _load_data(dataset, prof, data_dir, seed)
    dev = str(resolve_device(device))
    augment = None
    if prof.augment:
        from gevit_lib.augment import random_d4

        augment = random_d4()
    rows: list[dict[str, Any]] = []
    cache: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    vit: nn.Module | None = None
    vit_row: dict[str, Any] | None = None
    for spec in specs:
        t_start, c_start = time.perf_counter(), time.process_time()
        notes: list[str] = []
        if spec.family == "posthoc":
            if vit is None:
                raise ValueError("post-hoc rows need the ViT row before them")
            model: nn.Module = posthoc_mean(copy.deepcopy(vit), spec.group, finetune="model")
        else:
            seed_everything(seed)
            model = spec.build()
        row: dict[str, Any] = {"key": spec.key, "name": spec.name, "family": spec.family, "group": spec.group,
                               "patch_size": spec.patch_size, "invariance": spec.invariance,
                               "params": _count(model)}
        batch = prof.gevit_speed_batch if spec.family == "gevit" else prof.speed_batch
        for d in devices:
            speed = measure_speed(model, input_shape, num_classes, d, batch, prof.speed_steps, prof.speed_budget_s,
                                  seed=seed)
            row[f"train_img_s_{d}"] = speed["train_img_s"]
            row[f"infer_img_s_{d}"] = speed["infer_img_s"]
            row[f"peak_mem_mib_{d}"] = speed["peak_mem_mib"]
            if speed["note"]:
                notes.append(f"{d}: {speed['note']}")
        row.update({"epoch_s": None, "n_train": 0, "epochs": 0, "val_acc": None, "test_acc": None})
        if spec.family == "posthoc":
            assert vit_row is not None and spec.group is not None
            accs = [_posthoc_accuracy(vit, spec.group, prof.posthoc_groups, data[s], prof.eval_batch_size, dev,
                                      cache, s) for s in ("validation", "test")]
            row.update({"n_train": vit_row["n_train"], "epochs": vit_row["epochs"], "val_acc": accs[0],
                        "test_acc": accs[1]})
            notes.append("the trained ViT, no finetuning (training speed: finetuning the whole wrapper)")
        elif spec.published is not None and (published := _published_accuracy(spec.published, data, prof, dev)):
            row.update(published["row"])
            notes.append(published["note"])
        elif spec.train != "none":
            train, val, test = data["train"], data["validation"], data["test"]
            if spec.train == "subset":
                train = _head(train, prof.gevit_n_train)
                val, test = _head(val, prof.gevit_n_eval), _head(test, prof.gevit_n_eval)
                if _size(train) < _size(data["train"]) or _size(test) < _size(data["test"]):
                    notes.append(f"trained on {_size(train)} images only, evaluated on {_size(val)} / {_size(test)} "
                                 f"(too slow to train here at this profile)")
            cfg = _train_config(prof, spec.epochs, dev, seed, spec.key)
            result = fit(model, train, val, cfg, run_dir=out / "runs" / spec.key, resume=True, augment=augment,
                         progress=progress, test_data=test)
            seconds = [r["seconds"] for r in result.history]
            row.update({"epoch_s": sum(seconds) / len(seconds) if seconds else None, "n_train": _size(train),
                        "epochs": result.epochs_completed, "val_acc": _percent(result.best_val),
                        "test_acc": _percent(result.test)})
            if not seconds:
                notes.append("finished run reused from run_dir (no epoch timed)")
            if spec.family == "vit":
                vit, vit_row = model.cpu().eval(), row
        else:
            notes.append("speed only: not trained at this profile")
        row["speed_batch"] = batch
        row["note"] = "; ".join(notes)
        row["wall_s"] = time.perf_counter() - t_start
        row["cpu_s"] = time.process_time() - c_start
        rows.append(row)
        if progress:
            speeds = ", ".join(f"{d}: train {_fmt(row[f'train_img_s_{d}'])} / infer "
                               f"{_fmt(row[f'infer_img_s_{d}'])} img/s" for d in devices)
            print(f"[modern_vit] {spec.name}: {row['params']} params, {speeds}, test {_fmt(row['test_acc'])}% "
                  f"({row['wall_s']:.0f} s)", flush=True)
    meta = {**info, "train_device": dev, "speed_devices": devices, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "gevit_lib_version": __version__,
            "cuda_device": torch.cuda.get_device_name(0) if "cuda" in devices else None}
    return rows, meta


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def _out_dir(out_dir: str | os.PathLike[str] | None, name: str, profile: str) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    return Path("runs") / name / f"{profile}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------------------------------------------------
# Plot


def plot_ablation(rows: Sequence[dict[str, Any]], reference: dict[str, Any] | None = None, *,
                  title: str = "Accuracy vs. epoch time for different patch sizes", accuracy: str = "test_acc",
                  ax: Any = None) -> Any:
    """Scatter of accuracy against epoch time, one labelled point per patch size (the post's Fig. 14 layout).

    ``rows``: patch-model rows (``patch_size``, ``epoch_s``, ``accuracy`` column); ``reference``: a GE-ViT row
    whose estimated epoch time (``epoch_est_s``) is drawn as a dashed vertical line. Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 6))
    points = [r for r in rows if r.get("epoch_s") is not None and r.get(accuracy) is not None]
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(sorted(points, key=lambda r: r["patch_size"])):
        ax.scatter(r["epoch_s"], r[accuracy], s=100, alpha=0.7, edgecolors="white", color=cmap(i % 10),
                   label=f"patch {r['patch_size']}")
        ax.annotate(str(r["patch_size"]), (r["epoch_s"], r[accuracy]), textcoords="offset points", xytext=(10, 8))
    if reference is not None and reference.get("epoch_est_s"):
        ax.axvline(reference["epoch_est_s"], ls="--", color="grey",
                   label=f"{reference['name']} (epoch time from its measured throughput)")
        ax.set_xscale("log")
    ax.set_title(title, fontweight="bold", fontsize=14)
    n_train = sorted({r["n_train"] for r in points})
    on = f" on {n_train[0]:,} training images" if len(n_train) == 1 else ""
    ax.set_xlabel(f"Epoch time{on} (s, training + validation pass)")
    ax.set_ylabel("Test accuracy (%)" if accuracy == "test_acc" else "Validation accuracy (%)")
    ax.legend(title="Patch size", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    ax.grid(True, ls="--", alpha=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    figure = fig if fig is not None else ax.figure
    figure.tight_layout()
    return figure


def _reference_epoch(row: dict[str, Any], n_train: int, n_val: int, device: str) -> float | None:
    """Epoch time a model would need from its measured training / inference throughput on ``device``."""
    tr, inf = row.get(f"train_img_s_{device}"), row.get(f"infer_img_s_{device}")
    if not tr or not inf:
        return None
    return n_train / tr + n_val / inf


def _write(result: ZooResult, out: Path, stem: str, title: str, devices: list[str], seed: int,
           plot: bool) -> None:
    from gevit_lib.viz import save_figure, save_table

    meta = {"dataset": result.dataset, "data_source": result.meta.get("data_source"), "profile": result.profile,
            "seed": seed, "train_device": result.meta.get("train_device"),
            "speed_devices": ", ".join(devices), "torch_threads": result.meta.get("torch_threads")}
    rows = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in result.rows]
    paths = save_table(rows, out / stem, columns=_columns(devices), title=title, **meta)
    result.files += list(paths) + [out / f"{stem}.json"]
    if plot:
        import matplotlib.pyplot as plt

        patch_rows = [r for r in result.rows if r["family"] == "patch" and r["key"].endswith("_mean")
                      and r["group"] == result.meta["patch_group"]]
        ref = next((r for r in result.rows if r["key"] == "gevit_p4_P5"), None)
        if ref is not None:
            ref = {**ref, "epoch_est_s": _reference_epoch(ref, result.meta["n_train"], result.meta["n_val"],
                                                          result.meta["train_device"].split(":")[0])}
        fig = plot_ablation(patch_rows, ref,
                            title=f"Accuracy vs. epoch time for different patch sizes ({result.dataset}, "
                                  f"{result.profile})")
        result.files.append(save_figure(fig, out / "ablation.png", **meta,
                                        data_points=[{k: r[k] for k in ("patch_size", "epoch_s", "test_acc")}
                                                     for r in patch_rows]))
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The experiments


def model_zoo(profile: str = "quick", device: str = "cpu",
              data_dir: str | os.PathLike[str] | None = None, out_dir: str | os.PathLike[str] | None = None,
              seed: int = 0, *, dataset: str = "rotmnist", speed_devices: Sequence[str] | None = None,
              progress: bool = True, overrides: dict[str, Any] | None = None,
              models: Sequence[str] | None = None) -> ZooResult:
    """The speed / size / accuracy table of every model (see the module docstring) and the ablation plot.

    ``device``: where models are trained and evaluated ("cpu", "cuda", "auto"); ``speed_devices``: where speed is
    measured (default: CPU, plus the GPU when available). ``data_dir``: folder holding ``mnist/`` (rotated MNIST is
    regenerated from it when the official archive is absent) or ``pcam/``. ``out_dir`` (default
    ``runs/modern_vit_<dataset>/<profile>-<time>``) receives ``model_zoo.{csv,md,json}``, ``ablation.png`` (+
    ``.json``), ``meta.json`` and one ``runs/<model>`` training folder per trained model (reused on a re-run:
    finished trainings are not repeated, speeds are re-measured). ``overrides``: profile fields to change.
    ``models``: only these rows (keys as in the table's JSON, e.g. ``"patch_p4_p4_mean"``, ``"gevit_p4_P5"``;
    post-hoc rows bring the ViT row they wrap).
    """
    prof = modern_vit_profile(dataset, profile, overrides)
    out = _out_dir(out_dir, f"modern_vit_{dataset}", profile)
    devices = _speed_devices(speed_devices)
    specs = select_models(model_specs(dataset, prof), models)
    rows, meta = _run_models(dataset, prof, specs, device, data_dir, out, seed, devices, progress)
    meta.update({"profile_sizes": prof.to_dict(), "patch_group": prof.patch_group, "experiment": "model_zoo"})
    result = ZooResult(dataset, profile, rows, meta)
    _write(result, out, "model_zoo", f"Speed, size and accuracy of equivariant ViTs ({dataset}, profile {profile})",
           devices, seed, plot=any(r["family"] == "patch" for r in rows))
    _write_meta(result, out)
    return result


def patch_size_ablation(profile: str = "quick", device: str = "cpu",
                        data_dir: str | os.PathLike[str] | None = None, out_dir: str | os.PathLike[str] | None = None,
                        seed: int = 0, *, dataset: str = "rotmnist", speed_devices: Sequence[str] | None = None,
                        progress: bool = True, overrides: dict[str, Any] | None = None) -> ZooResult:
    """The patch-size ablation alone (SPEC 8.6; at ``full`` on PCam: patch 2, 3, 6, 12, 16, 50 epochs): the
    mean-embedding patch models of ``patch_sizes`` plus the speed of GE-ViT p4, P=5 as the reference line.
    Writes ``ablation.{csv,md,json}``, ``ablation.png`` and ``meta.json`` into ``out_dir``; arguments as
    :func:`model_zoo`."""
    prof = modern_vit_profile(dataset, profile, overrides)
    prof = replace(prof, gevit_trained=())
    out = _out_dir(out_dir, f"patch_ablation_{dataset}", profile)
    devices = _speed_devices(speed_devices)
    specs = [s for s in model_specs(dataset, prof)
             if (s.family == "patch" and s.group == prof.patch_group and s.key.endswith("_mean")
                 and s.patch_size in prof.patch_sizes) or s.key == "gevit_p4_P5"]
    if not specs:
        raise ValueError("the profile selects no patch model (patch_sizes is empty)")
    rows, meta = _run_models(dataset, prof, specs, device, data_dir, out, seed, devices, progress)
    meta.update({"profile_sizes": prof.to_dict(), "patch_group": prof.patch_group, "experiment": "patch_ablation"})
    result = ZooResult(dataset, profile, rows, meta)
    _write(result, out, "ablation", f"Patch-size ablation ({dataset}, profile {profile})", devices, seed, plot=True)
    _write_meta(result, out)
    return result


def _write_meta(result: ZooResult, out: Path) -> None:
    import json

    from gevit_lib.files import atomic_write

    with atomic_write(out / "meta.json") as tmp:
        tmp.write_text(json.dumps({"dataset": result.dataset, "profile": result.profile, **result.meta,
                                   "rows": result.rows}, indent=2, default=str) + "\n")
    result.files.append(out / "meta.json")
