"""Synthetic stand-ins for the real data, in the genuine file formats, for tests and the smoke profile: small, made
up, and (MNIST) loading with ``source == "unverified"``, so they never pass for the real thing."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from gevit_lib.data import MNIST_FILES, PCAM_FILES
from gevit_lib.files import atomic_write

def write_idx(path: str | os.PathLike[str], arr: np.ndarray, header_dims: tuple[int, ...] | None = None) -> None:
    """Write ``arr`` as an unsigned-byte IDX file (gzipped when ``path`` ends in .gz); ``header_dims`` overrides the
    dimensions the header claims (for truncated files)."""
    dims = header_dims or arr.shape
    raw = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + arr.astype(np.uint8).tobytes()
    with atomic_write(path) as tmp:
        tmp.write_bytes(gzip.compress(raw, mtime=0) if str(path).endswith(".gz") else raw)


def make_synthetic_mnist(root: str | os.PathLike[str], n_train: int = 600, n_test: int = 100,
                         seed: int = 0) -> Path:
    """Write fake MNIST (``<root>/mnist/*-idx?-ubyte.gz``) and return that folder: per class a fixed random stroke
    pattern, shifted by up to 2 pixels and scaled in intensity per image (learnable, not rotation symmetric)."""
    if n_train == MNIST_FILES["train-images-idx3-ubyte"].count or n_test == MNIST_FILES["t10k-images-idx3-ubyte"].count:
        raise ValueError("synthetic MNIST cannot have the official sizes 60,000 / 10,000 (they are md5-checked)")
    if n_train < 30 or n_test < 1:
        raise ValueError(f"need n_train >= 30 (for a validation split) and n_test >= 1, got {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    templates = np.zeros((10, 28, 28))
    for k in range(10):
        points = rng.uniform(6, 21, size=(4, 2))
        for a, b in zip(points[:-1], points[1:]):
            for t in np.linspace(0, 1, 24):
                cy, cx = a + t * (b - a)
                templates[k] = np.maximum(templates[k], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0))
    padded = np.pad(templates, ((0, 0), (2, 2), (2, 2)))

    folder = Path(root) / "mnist"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        shifts = rng.integers(0, 5, size=(n, 2))
        scale = rng.uniform(0.7, 1.0, size=n)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        for i, ((dy, dx), label) in enumerate(zip(shifts, labels)):
            images[i] = np.clip(np.rint(255 * scale[i] * padded[label, dy:dy + 28, dx:dx + 28]), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def write_fake_pcam(root: str | os.PathLike[str], n_per_split: int = 16, seed: int = 0) -> Path:
    """Write small h5 files in the PCam format into ``<root>/pcam`` (returned): pinkish noise; label-1 patches (half,
    in a seeded order) with a dark purple blob in the centre 32x32 region, where the PCam label is defined."""
    import h5py

    rng = np.random.default_rng(seed)
    folder = Path(root) / "pcam"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:96, 0:96]
    for x_name, y_name in PCAM_FILES.values():
        labels = rng.permutation(np.arange(n_per_split) % 2).astype(np.uint8)
        images = np.array([220.0, 170.0, 210.0]) + rng.normal(0, 12, size=(n_per_split, 96, 96, 3))
        for i in np.flatnonzero(labels):
            cy, cx = rng.uniform(36, 60, size=2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 8.0 ** 2))[..., None]
            images[i] -= blob * np.array([120.0, 130.0, 60.0])
        with atomic_write(folder / x_name) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("x", data=np.clip(np.rint(images), 0, 255).astype(np.uint8))
        with atomic_write(folder / y_name) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("y", data=labels.reshape(-1, 1, 1, 1))
    return folder
