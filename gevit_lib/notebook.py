"""What the notebooks load: published models and rotated-MNIST digits. A missing checkpoint or dataset is an error
that says what to download, except in ``smoke`` (the tests), where it becomes an untrained model of the same
architecture or a small synthetic MNIST, labelled as such in every provenance record.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .files import ChecksumError, MissingFileError
from .models import create_model, load_published, published_weights
from .profiles import check_profile
from .viz import portable_path

__all__ = ["published_model", "rotated_digits", "smoke_mnist_root", "digits_root", "normalize", "pick_digits",
           "Digits", "load_digits", "predict", "posthoc_knob"]


def published_model(name: str, profile: str, weights: str | os.PathLike[str] | None = None,
                    **options: Any) -> tuple[nn.Module, str]:
    """``(model in eval mode, provenance label)``; ``weights``: a state-dict file (e.g. a run's ``best.pt``) instead
    of the published file; in ``smoke`` an untrained stand-in when the file is unavailable."""
    check_profile(profile)
    if weights is not None:
        from .checkpointing import load_file
        from .hub import load_into

        state = load_file(weights)
        model = load_into(create_model(name, **options), state, source=str(weights))
        return model.eval(), f"{name} architecture, weights {portable_path(Path(weights).resolve())}"
    try:
        model = load_published(name, download=profile != "smoke", **options)
        return model, f"{name} (sha256 {published_weights(name).sha256[:16]})"
    except (MissingFileError, ChecksumError) as exc:
        if profile != "smoke":
            raise
        warnings.warn(f"smoke profile: {name} unavailable ({type(exc).__name__}); using an untrained stand-in",
                      stacklevel=2)
        return create_model(name, **options).eval(), f"untrained {name} architecture (checkpoint unavailable)"


def smoke_mnist_root() -> Path:
    """A folder with a small synthetic MNIST (written once per cache dir), for smoke runs without real data."""
    from .testing import make_synthetic_mnist

    base = Path(os.environ.get("GEVIT_CACHE_DIR") or tempfile.gettempdir()) / "gevit_smoke_mnist"
    if not (base / "mnist" / "t10k-labels-idx1-ubyte.gz").exists():
        make_synthetic_mnist(base, n_train=600, n_test=100, seed=0)
    return base


def rotated_digits(split: str, profile: str, data_dir: str | os.PathLike[str] | None = None,
                   **kwargs: Any) -> tuple[Dataset, str]:
    """``(rotated MNIST split, data-source label)``: official archive, else regenerated; smoke falls back."""
    from .data import UnverifiedDataWarning, rotated_mnist

    check_profile(profile)
    try:  # smoke never reaches for the network: it falls back instead
        ds = rotated_mnist(split, root=data_dir, download=profile != "smoke", **kwargs)
    except MissingFileError:
        if profile != "smoke":
            raise
        with warnings.catch_warnings():  # the stand-in is small by design and labelled as synthetic below
            warnings.simplefilter("ignore", UnverifiedDataWarning)
            ds = rotated_mnist(split, root=smoke_mnist_root(), download=False, **kwargs)
        return ds, f"synthetic MNIST stand-in ({getattr(ds, 'source', '?')}; real MNIST unavailable)"
    return ds, data_label(ds)


def data_label(ds: Any) -> str:
    """A rotated-MNIST split's source by name and checksum (never the folder it was read from)."""
    info = ds.describe()
    if info.get("source") == "official":
        return f"official MNIST-rot archive (md5 {info['archive_md5']})"
    if info.get("source") == "regenerated":
        return (f"regenerated rotated MNIST v{info['recipe_version']}, seed {info['seed']}, from MNIST "
                f"({info['mnist_source']}, sha256 {info['mnist_fingerprint'][:16]})")
    return f"rotated MNIST ({info.get('source', 'unknown')})"


def digits_root(profile: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[str | None, str]:
    """``(root for the MNIST loaders, data-source label)``: ``data_dir``, or in ``smoke`` the stand-in's folder."""
    ds, label = rotated_digits("test", profile, data_dir)
    return (str(smoke_mnist_root()) if "stand-in" in label else (str(data_dir) if data_dir else None)), label


def normalize(raw: Tensor) -> Tensor:
    """MNIST normalisation ``(raw - mean) / std`` of raw images (pixels in [0, 1], background 0)."""
    from .data import MNIST_MEAN, MNIST_STD

    return (raw - MNIST_MEAN[0]) / MNIST_STD[0]


def pick_digits(dataset: Any, labels: Sequence[int] | None = None, n: int = 1, among: Sequence[int] | None = (3, 8),
                start: int = 0) -> list[int]:
    """Indices of the first ``n`` images (of each of ``labels``, in turn) at or after position ``start`` among the
    images labelled ``among`` (None: all); a ValueError when there are fewer."""
    stored = getattr(dataset, "labels", None)
    all_labels = np.asarray(stored if stored is not None else [int(dataset[i][1]) for i in range(len(dataset))])
    positions = np.arange(len(all_labels)) if among is None else np.flatnonzero(np.isin(all_labels, list(among)))
    subset = "" if among is None else f" among labels {list(among)}"
    if labels is None:
        if len(positions[start:start + n]) < n:
            raise ValueError(f"only {len(positions[start:])} images{subset} at or after position {start} "
                             f"(asked for {n})")
        return [int(i) for i in positions[start:start + n]]
    chosen: list[int] = []
    for label in labels:
        hits = [int(i) for i in positions[start:] if all_labels[i] == label and int(i) not in chosen][:n]
        if len(hits) < n:
            raise ValueError(f"fewer than {n} images with label {label}{subset} at or after position {start}")
        chosen += hits
    return chosen


@dataclass
class Digits:
    """Raw digits ``[N, 1, H, W]`` (pixels in [0, 1]) with their labels and where they came from."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    split: str
    data_source: str

    def describe(self) -> dict[str, Any]:
        """For provenance sidecars: split, dataset indices and labels."""
        return {"split": self.split, "indices": list(self.indices), "labels": [int(v) for v in self.labels]}


def load_digits(split: str, profile: str, data_dir: str | os.PathLike[str] | None = None, n: int = 1,
                labels: Sequence[int] | None = None, start: int = 0, fallback_start: int | None = None) -> Digits:
    """Raw rotated-MNIST 3s and 8s of ``split`` (the post's figure digits) chosen by :func:`pick_digits`, from
    ``fallback_start`` when there are too few at or after ``start`` (small smoke data)."""
    ds, source = rotated_digits(split, profile, data_dir, normalize=False)
    try:
        indices = pick_digits(ds, labels, n, start=start)
    except ValueError:
        if fallback_start is None:
            raise
        indices = pick_digits(ds, labels, n, start=fallback_start)
    items = [ds[i] for i in indices]
    images, targets = torch.stack([im for im, _ in items]), torch.tensor([int(lb) for _, lb in items])
    return Digits(images, targets, indices, split, source)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 32) -> Tensor:
    """``model(x)`` in batches, on the model's device and dtype; returned on the CPU."""
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())
    return torch.cat([model(x[i:i + batch_size].to(device, dtype)).cpu() for i in range(0, len(x), batch_size)])


def posthoc_knob(backbone: nn.Module, wrappers: Mapping[str, nn.Module], test: Dataset, interactive: bool,
                 device: str | torch.device = "cpu") -> Any:
    """The post-hoc notebooks' knob: a test digit and an angle against the prediction and confidence of
    ``backbone`` and of each named wrapper around it (PostHoc, Canonicalized, ...). The predictions of 3 test digits
    at every 15 degrees are computed once (one backbone pass per group for all PostHoc wrappers);
    the knob picks one (a batch run: the first digit at 45 degrees)."""
    from IPython.display import display
    from PIL import Image as PILImage

    from .data import MNIST_BACKGROUND, evenly_spaced
    from .groups import rotate
    from .viz import figure_to_array, knobs, new_figure

    picked = evenly_spaced(len(test), 3).tolist()
    images = torch.stack([test[i][0] for i in picked])  # [D, 1, H, W], normalised
    truth = [int(test[i][1]) for i in picked]
    turns = list(range(0, 360, 15))
    turned = torch.stack([rotate(images - MNIST_BACKGROUND, a, "bilinear") + MNIST_BACKGROUND for a in turns])
    x = turned.flatten(0, 1).to(device)  # [angles * digits, 1, H, W]
    for model in (backbone, *wrappers.values()):
        model.eval().to(device)
    with torch.no_grad():
        shared = {n: w for n, w in wrappers.items() if hasattr(w, "transformed_embeddings")}  # PostHoc
        one_per_group = {w.group.name: w for w in shared.values()}
        embeddings = {g: w.transformed_embeddings(x) for g, w in one_per_group.items()}  # [A * D, T, E]
        logits = {"base model": backbone(x)} | {n: w.aggregate(embeddings[w.group.name]) if n in shared else w(x)
                                                for n, w in wrappers.items()}
    probs = {n: z.float().softmax(-1).cpu().unflatten(0, turned.shape[:2]) for n, z in logits.items()}  # [A, D, K]

    def draw(digit: int = 0, angle: int = 45) -> None:
        a = turns.index(angle)
        fig = new_figure((720, 120 + 20 * len(probs)), dpi=72)
        grid = fig.add_gridspec(1, 2, width_ratios=(1, 3), left=0.02, right=0.97, top=0.9, bottom=0.12, wspace=0.6)
        ax = fig.add_subplot(grid[0])
        ax.imshow(turned[a, digit, 0].numpy(), cmap="gray")
        ax.set_title(f"class {truth[digit]}, turned {angle}°", fontsize=10)
        ax.axis("off")
        ax = fig.add_subplot(grid[1])
        p = torch.stack([q[a, digit] for q in probs.values()])  # [methods, classes]
        confidence, predicted = p.max(-1)
        ax.barh(range(len(p)), confidence.numpy(),
                color=["tab:green" if int(c) == truth[digit] else "tab:red" for c in predicted])
        ax.set_yticks(range(len(p)), [f"{name}: {int(c)}" for name, c in zip(probs, predicted)], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("confidence in the predicted class (green: right)")
        display(PILImage.fromarray(figure_to_array(fig, dpi=72)))

    return knobs(draw, interactive, digit=[(f"test image {picked[i]} (class {t})", i) for i, t in enumerate(truth)],
                 angle=(0, turns[-1], 15))
