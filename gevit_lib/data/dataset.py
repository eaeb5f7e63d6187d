"""The split names, the in-memory image dataset every loader returns, split selection and subset helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ._cache import array_checksum

SPLITS = ("train", "validation", "test")
Transform = Callable[[Tensor], Tensor]
FRACTION_SEED = 0  # the original: torch.manual_seed(0); torch.randperm(n)[:int(n * fraction)]


class NormalizedImages(Dataset):
    """Shared part: labels, row indices and provenance; uint8 [H, W] or [H, W, C] pixels -> float32 [C, H, W] in
    [0, 1], optionally normalised."""

    def __init__(self, labels: np.ndarray, indices: np.ndarray, *, name: str, split: str, source: str,
                 num_classes: int, mean: Sequence[float], std: Sequence[float], normalize: bool,
                 transform: Transform | None, info: dict[str, Any] | None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name, self.split, self.source, self.num_classes = name, split, source, num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = normalize
        self.transform = transform
        self._info = dict(info or {})
        self._described: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _to_float(self, pixels: np.ndarray) -> Tensor:
        """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W], the same float32 ops as ToTensor + Normalize."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        if self.normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            x = x.sub_(mean).div_(std)
        return x

    def _item(self, pixels: np.ndarray, label: int) -> tuple[Tensor, Tensor]:
        x = self._to_float(pixels[None])[0]
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(int(label), dtype=torch.int64)

    def _checksum(self) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Where this split came from: dataset, split, source, sizes, checksum, options (JSON-serialisable)."""
        if self._described is None:
            self._described = {"dataset": self.name, "split": self.split, "source": self.source,
                               "size": len(self), "num_classes": self.num_classes, **self._info,
                               "normalize": self.normalize, "checksum": self._checksum()}
        return dict(self._described)


class ImageDataset(NormalizedImages):
    """An in-memory split: ``images`` uint8 [N, H, W] (or [N, H, W, C]) and ``labels`` int64 [N]; ``indices`` [N]
    gives each item's row in the array the split was taken from. Items: pixels / 255, then ``(x - mean) / std``
    when ``normalize``, then ``transform`` (a function of the float tensor)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str, split: str, source: str,
                 indices: np.ndarray, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 normalize: bool = True, transform: Transform | None = None,
                 info: dict[str, Any] | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
        if len(labels) != len(images) or len(indices) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels and {len(indices)} indices")
        super().__init__(labels, indices, name=name, split=split, source=source, num_classes=num_classes, mean=mean,
                         std=std, normalize=normalize, transform=transform, info=info)
        self.images = images
        self.angles: np.ndarray | None = None  # degrees, counter-clockwise (regenerated rotated MNIST only)
        self.source_indices: np.ndarray | None = None  # row in the source file (rotated MNIST)
        self.source_split: np.ndarray | None = None  # 0 = MNIST train file, 1 = MNIST test file (regenerated)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._item(self.images[index], self.labels[index])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split at once: float32 [N, C, H, W] (scaled and normalised as items) and int64 labels [N]."""
        if self.transform is not None:
            raise ValueError("tensors() cannot apply the per-item transform; iterate the dataset instead")
        return self._to_float(self.images), torch.from_numpy(self.labels.copy())

    def _checksum(self) -> str:
        return array_checksum(self.images, self.labels)


def check_split(split: str) -> str:
    if split not in SPLITS:
        hint = " (use 'validation')" if split in ("val", "valid", "dev") else ""
        raise ValueError(f"unknown split {split!r}{hint}: expected one of 'train', 'validation', 'test'; "
                         f"model selection must only use 'validation'")
    return split


def check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def check_digits(digits: Sequence[int] | None) -> tuple[int, ...] | None:
    if digits is None:
        return None
    out = tuple(int(d) for d in digits)
    if not out or len(set(out)) != len(out) or not all(0 <= d <= 9 for d in out):
        raise ValueError(f"digits must be distinct labels in 0..9, got {list(out)}")
    return out


def select(labels: np.ndarray, digits: Sequence[int] | None, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows to keep and their labels: ``digits`` filter (relabelled 0..k-1 in the given order), then ``fraction``.

    The fraction subset is the original's: ``torch.manual_seed(0); torch.randperm(n)[:int(n * fraction)]`` (done
    with a private generator, so the global torch RNG is untouched), in that permuted order.
    """
    rows = np.arange(len(labels))
    labels = np.asarray(labels, dtype=np.int64)
    digits = check_digits(digits)
    if digits is not None:
        mapping = np.full(10, -1, dtype=np.int64)
        mapping[list(digits)] = np.arange(len(digits))
        keep = mapping[labels] >= 0
        rows, labels = rows[keep], mapping[labels[keep]]
    check_fraction(fraction)
    if fraction < 1.0:
        n = int(len(rows) * fraction)
        if n == 0:
            raise ValueError(f"fraction {fraction} of {len(rows)} images keeps none")
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(FRACTION_SEED))[:n].numpy()
        rows, labels = rows[perm], labels[perm]
    return rows, labels


def evenly_spaced(n_total: int, n: int | None) -> Tensor:
    """``n`` indices spread evenly over ``range(n_total)`` (all of them when ``n`` is None or too large)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.arange(n) * n_total // n


def random_subset(n_total: int, n: int | None, seed: int) -> Tensor:
    """``n`` sorted indices of ``range(n_total)`` drawn with ``seed`` (all of them when ``n`` is None or too large)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def take_subset(ds: Dataset, idx: Tensor) -> Dataset | tuple[Tensor, Tensor]:
    """In-memory datasets become (inputs, labels) tensors (fast); lazily read ones (PCam h5) a Subset."""
    tensors = getattr(ds, "tensors", None)
    if callable(tensors) and getattr(ds, "transform", None) is None:
        x, y = tensors()
        return x[idx], y[idx]
    return Subset(ds, idx.tolist())
