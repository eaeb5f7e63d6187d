"""Shared parts of the loaders: split names, the dataset classes, split selection and subset helpers, the
per-process memo, array checksums and the cache folder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

SPLITS = ("train", "validation", "test")
Transform = Callable[[Tensor], Tensor]
FRACTION_SEED = 0  # the original: torch.manual_seed(0); torch.randperm(n)[:int(n * fraction)]
# One per-process memo for verified files, parsed idx files and parsed / regenerated arrays. Keys start with a
# kind ("idx", "mnist", "verified", "npz") and identify files by (path, size, mtime) so a changed file is re-read.
MEMO: dict[tuple, Any] = {}


def clear_caches() -> None:
    """Forget every per-process cache (verified files, parsed and regenerated arrays)."""
    MEMO.clear()


def memo(key: tuple, build: Callable[[], Any]) -> Any:
    if key not in MEMO:
        MEMO[key] = build()
    return MEMO[key]


def array_checksum(*arrays: np.ndarray) -> str:
    """sha256 over each array's dtype, shape and C-order bytes (stable across machines for fixed dtypes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def writable(path: Path) -> bool:
    """True when ``path`` (or its nearest existing parent) may be written: permission bits, not only root's access."""
    p = Path(path).absolute()
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK) and bool(p.stat().st_mode & 0o222)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache folder for parsed / regenerated arrays: ``cache_dir``, else ``$GEVIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/gevit_companion`` (``~/.cache/...``); never a data folder (it may be shared and read-only)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GEVIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gevit_companion"


class NormalizedImages(Dataset):
    """A split's labels, row indices and provenance. Items: uint8 pixels [H, W] or [H, W, C] -> float32 [C, H, W],
    x / 255, then ``(x - mean) / std`` when ``normalize``, then ``transform`` (a function of the float tensor)."""

    def __init__(self, labels: np.ndarray, indices: np.ndarray, *, name: str, split: str, source: str,
                 num_classes: int, mean: Sequence[float], std: Sequence[float], normalize: bool = True,
                 transform: Transform | None = None, info: dict[str, Any] | None = None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name, self.split, self.source, self.num_classes = name, split, source, num_classes
        self.mean, self.std, self.normalize, self.transform = tuple(mean), tuple(std), normalize, transform
        self._info = dict(info or {})

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

    def _checksum(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Where this split came from: dataset, split, source, sizes, checksum, options (JSON-serialisable)."""
        return {"dataset": self.name, "split": self.split, "source": self.source, "size": len(self),
                "num_classes": self.num_classes, **self._info, "normalize": self.normalize,
                "checksum": self._checksum()}


class ImageDataset(NormalizedImages):
    """An in-memory split: ``images`` uint8 [N, H, W] (or [N, H, W, C]), ``labels`` int64 [N]; ``indices`` [N]
    gives each item's row in the array the split was taken from."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, **kwargs: Any) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
        if len(labels) != len(images) or len(indices) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels and {len(indices)} indices")
        super().__init__(labels, indices, **kwargs)
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


def check_args(split: str, fraction: float = 1.0, digits: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """ValueError for an unknown split, a fraction outside (0, 1] or bad digits; returns the digits as a tuple."""
    if split not in SPLITS:
        hint = " (use 'validation')" if split in ("val", "valid", "dev") else ""
        raise ValueError(f"unknown split {split!r}{hint}: expected one of 'train', 'validation', 'test'; "
                         f"model selection must only use 'validation'")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if digits is None:
        return None
    out = tuple(int(d) for d in digits)
    if not out or len(set(out)) != len(out) or not all(0 <= d <= 9 for d in out):
        raise ValueError(f"digits must be distinct labels in 0..9, got {list(out)}")
    return out


def select(labels: np.ndarray, digits: tuple[int, ...] | None, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows to keep and their labels: ``digits`` filter (relabelled 0..k-1 in the given order), then ``fraction``:
    the original's ``torch.manual_seed(0); torch.randperm(n)[:int(n * fraction)]``, in that permuted order (with a
    private generator, so the global torch RNG is untouched)."""
    rows = np.arange(len(labels))
    labels = np.asarray(labels, dtype=np.int64)
    if digits is not None:
        mapping = np.full(10, -1, dtype=np.int64)
        mapping[list(digits)] = np.arange(len(digits))
        keep = mapping[labels] >= 0
        rows, labels = rows[keep], mapping[labels[keep]]
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
