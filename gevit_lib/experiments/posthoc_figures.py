"""Reports and figures of the post-hoc notebooks: our tables next to the post's, the "6 that looks like a 9"
figure, and the attention of the learned transformer aggregator over the transformed copies.

The post's numbers are read from the authors' result CSVs (``../shared/reference/results`` beside the repository,
or ``$GEVIT_SHARED_DIR/reference/results``) when present; without them the comparison columns stay empty.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..posthoc import METHODS, PostHoc
from ..profiles import posthoc_profile
from ..train import TrainConfig, fit
from ..viz import save_figure, save_table
from .posthoc import MNIST_BACKGROUND, PostHocResult, evenly_spaced, random_subset, take_subset, random_rotation

__all__ = ["reference_results", "comparison_rows", "save_comparison", "find_six_like_nine", "plot_six_like_nine",
           "train_attention_aggregator", "aggregator_attention", "plot_aggregator_attention"]

_REPO = Path(__file__).resolve().parents[2]
# our experiment name -> the authors' CSV prefix; our mode -> their file suffix
_CSV_PREFIX = {"rotmnist": "rotmnist", "mnist_to_rotmnist": "train_mnist", "low_data": "less_data_rotmnist",
               "pcam": "pcam_resnet"}
_CSV_MODE = {"none": "no_finetune", "head": "finetune_mlp", "model": "finetune_model"}


def _results_dir() -> Path:
    return Path(os.environ.get("GEVIT_SHARED_DIR", _REPO.parent / "shared")) / "reference" / "results"


def reference_results(experiment: str) -> dict[tuple[str, str], tuple[float, float]] | None:
    """The post's (validation, test) accuracy per (mode, method key) from the authors' CSVs, or None if absent."""
    folder = _results_dir()
    by_class = {info.original_class: key for key, info in METHODS.items()}
    found: dict[tuple[str, str], tuple[float, float]] = {}
    for mode, suffix in _CSV_MODE.items():
        path = folder / f"{_CSV_PREFIX[experiment]}__{suffix}.csv"
        if not path.is_file():
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                name = row["Model"].strip()
                key = "base" if name == "VisionTransformer" else by_class.get(name)
                if key:
                    found[(mode, key)] = (float(row["Validation Accuracy"]), float(row["Test Accuracy"]))
    return found or None


def comparison_rows(result: PostHocResult) -> list[dict[str, Any]]:
    """One row per (mode, method): our validation/test accuracy next to the post's (empty when unavailable)."""
    ref = reference_results(result.experiment) or {}
    rows = []
    for row in result.rows:
        post = ref.get((row["mode"], row["method"]))
        rows.append({"mode": row["mode"], "method": row["method"], "post_name": row["post_name"],
                     "group": row["group"] or "-", "val_acc": round(float(row["val_acc"]), 2),
                     "test_acc": round(float(row["test_acc"]), 2),
                     "post_val_acc": post[0] if post else "", "post_test_acc": post[1] if post else ""})
    return rows


def save_comparison(result: PostHocResult, out_dir: str | os.PathLike[str], name: str, *, data_source: str,
                    checkpoint: str, seed: int) -> Path:
    """Write ``<name>.csv`` / ``.md`` / ``.json`` into ``out_dir``: our table next to the post's numbers."""
    ref_dir = _results_dir()
    csv_path, _ = save_table(
        comparison_rows(result), Path(out_dir) / f"{name}.csv",
        title=f"Post-hoc equivariance: {result.experiment} (profile {result.profile})",
        data_source=data_source, checkpoint=checkpoint, profile=result.profile, seed=seed,
        n_val=result.meta.get("n_val"), n_test=result.meta.get("n_test"),
        post_numbers=str(ref_dir) if reference_results(result.experiment) else "unavailable")
    return csv_path


@torch.no_grad()
def find_six_like_nine(backbone: nn.Module, data: Dataset, *, group: str = "C16", six: int = 6, nine: int = 9,
                       max_candidates: int = 400, device: str = "cpu") -> dict[str, Any]:
    """A digit ``six`` on which mean pooling leans towards ``nine`` while most certain does not (SPEC 7.5).

    Among the first ``max_candidates`` sixes, picks the one maximising p_mean(nine) * p_certain(six): mean
    pooling fooled, most certain not.
    Returns the image, its dataset index and each method's class probabilities (softmax of its logits).
    """
    methods = ("mean", "most_probable", "most_certain")
    wrappers = {m: PostHoc(backbone, m, group).eval().to(device) for m in methods}
    idx = [i for i in range(len(data)) if int(data[i][1]) == six][:max_candidates]
    if not idx:
        raise ValueError(f"no digit {six} in the data")
    images = torch.stack([data[i][0] for i in idx]).to(device)
    emb = wrappers["mean"].transformed_embeddings(images)  # one backbone pass shared by the three methods
    probs = {m: torch.softmax(w.aggregate(emb).float(), -1).cpu() for m, w in wrappers.items()}
    score = probs["mean"][:, nine] * probs["most_certain"][:, six]
    best = int(score.argmax())
    return {"index": idx[best], "image": images[best].cpu(), "label": six,
            "probs": {m: p[best] for m, p in probs.items()}, "group": group}


def plot_six_like_nine(found: dict[str, Any], path: str | os.PathLike[str], **meta: Any) -> Path:
    """Input digit and the class probabilities of mean pooling, most probable and most certain (960x540 px)."""
    fig, axes = plt.subplots(1, 4, figsize=(9.6, 5.4), gridspec_kw={"width_ratios": [1.2, 1, 1, 1]})
    axes[0].imshow(found["image"][0], cmap="gray")
    axes[0].set_title(f"Target: {found['label']}")
    axes[0].axis("off")
    for ax, (method, p) in zip(axes[1:], found["probs"].items()):
        ax.bar(range(len(p)), p.numpy(), color=["tab:red" if i == int(p.argmax()) else "tab:blue"
                                                for i in range(len(p))])
        ax.set_title(f"{METHODS[method].post_name}\n({found['group']})", fontsize=10)
        ax.set_xticks(range(len(p)))
        ax.set_ylim(0, 1)
        ax.set_xlabel("class label")
    axes[1].set_ylabel("predicted probability")
    fig.tight_layout()
    out = save_figure(fig, path, dpi=100, dataset_index=found["index"], group=found["group"],
                      probabilities={m: [round(float(v), 4) for v in p] for m, p in found["probs"].items()}, **meta)
    plt.close(fig)
    return out


def train_attention_aggregator(backbone: nn.Module, train_data: Any, val_data: Any, profile: str, *,
                               device: str = "cpu", seed: int = 42, progress: bool = False) -> PostHoc:
    """The learned transformer aggregator (D4, as the original built it) trained on a frozen backbone with the
    profile's finetuning settings and subset sizes (Adam, random rotations, best on validation)."""
    settings = posthoc_profile("rotmnist", profile)
    train_data = take_subset(train_data, random_subset(len(train_data), settings.n_train, seed))
    val_data = take_subset(val_data, evenly_spaced(len(val_data), settings.n_val))
    wrapper = PostHoc(backbone, "learned_attention", settings.learned_group, finetune="none")
    config = TrainConfig(epochs=settings.epochs_attention, batch_size=settings.batch_size, optimizer=settings.optimizer,
                         lr=settings.lr, seed=seed, device=device, select_initial=True, label="learned_attention")
    fit(wrapper, train_data, val_data, config, augment=random_rotation(180.0, fill=MNIST_BACKGROUND),
        progress=progress)
    return wrapper.eval()


@torch.no_grad()
def aggregator_attention(wrapper: PostHoc, image: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
    """For every transformed copy ``T_t image`` (t over the wrapper's group): the copy and the attention maps
    ``[1 + T, 1 + T]`` of every attention layer of the learned aggregator run on it."""
    if wrapper.method != "learned_attention":
        raise ValueError(f"needs a learned_attention wrapper, got {wrapper.method!r}")
    wrapper.eval()
    copies = wrapper.transforms(image[None])[0]  # [T, C, H, W]
    rows = []
    for copy in copies:
        emb = wrapper.transformed_embeddings(copy[None])
        maps = wrapper.aggregator.attention_maps(emb)  # type: ignore[union-attr]
        rows.append((copy.cpu(), [m[0].float().cpu() for m in maps]))
    return rows


def plot_aggregator_attention(rows: list[tuple[Tensor, list[Tensor]]], path: str | os.PathLike[str],
                              **meta: Any) -> Path:
    """One row per transformed input: the input and each attention map, grey (700x1000 px, as in the post)."""
    n_rows, n_maps = len(rows), len(rows[0][1])
    fig, axes = plt.subplots(n_rows, 1 + n_maps, figsize=(7, 10), squeeze=False)
    size = rows[0][1][0].shape[-1]
    ticks = [0, size // 2, size - 1]
    labels = ["CLS"] + [f"g_{t}" for t in ticks[1:]]
    for r, (img, maps) in enumerate(rows):
        axes[r, 0].imshow(img[0], cmap="gray")
        axes[r, 0].axis("off")
        for c, m in enumerate(maps, start=1):
            axes[r, c].imshow(m, cmap="gray", vmin=0)
            axes[r, c].set_xticks(ticks, labels, fontsize=6)
            axes[r, c].set_yticks(ticks, labels, fontsize=6)
            if r == 0:
                axes[r, c].set_title(f"MHA block {c - 1}", fontsize=8)
    axes[0, 0].set_title("Input image", fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=100, **meta)
    plt.close(fig)
    return out
