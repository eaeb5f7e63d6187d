"""Rotated MNIST: the official MNIST-rot archive (Larochelle et al. 2007) or a deterministic re-creation.

The archive is used when present (``source="official"``); otherwise the same split sizes are regenerated from
genuine MNIST with a frozen, seeded recipe (``source="regenerated"``, "MNIST-rot-like"). Both are cached as npz in
the cache folder. Compare results on the latter with published numbers only loosely (docs/mnist_rot.md).
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gevit_lib.files import ChecksumError, MissingFileError, RemoteFile, atomic_write, data_dir, fetch, verify

from .dataset import (SPLITS, ImageDataset, Transform, array_checksum, check_args, file_key, memo, resolve_cache_dir,
                      writable)
from .mnist import MnistArrays, load_mnist_arrays, mnist_split

REGEN_SEED = 0  # np.random.default_rng(0) drives the regenerated rotated-MNIST recipe
REGEN_VERSION = 1  # bump when the recipe changes; part of the cache file name
MNIST_ROT_ARCHIVE = RemoteFile("mnist_rotation_new.zip",
                               "http://www.iro.umontreal.ca/~lisa/icml2007data/mnist_rotation_new.zip",
                               "0f9a947ff3d30e95cd685462cbf3b847", "md5")
MNIST_ROT_MEMBERS = {"train_valid": "mnist_all_rotation_normalized_float_train_valid.amat",
                     "test": "mnist_all_rotation_normalized_float_test.amat"}


# Not groups.rotate: this float64 numpy recipe is frozen, its output is pinned by checksums across machines.
def rotate_images(images: np.ndarray, angles: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Rotate each [H, W] image counter-clockwise as displayed (like torchvision's ``rotate``) by ``angles`` degrees,
    bilinearly about ((H-1)/2, (W-1)/2) with zero fill; float64 with ``math`` cos / sin, reproducible across
    machines. Returns float64 [N, H, W]."""
    images = np.asarray(images)
    n, h, w = images.shape
    if len(angles) != n:
        raise ValueError(f"{n} images but {len(angles)} angles")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    dy, dx = np.meshgrid(np.arange(h, dtype=np.float64) - cy, np.arange(w, dtype=np.float64) - cx, indexing="ij")
    # zero padding wide enough that every source pixel and its neighbours lie inside: that is the zero fill
    pad = int(math.ceil(math.hypot(cy, cx) - min(cy, cx))) + 1
    hp, wp = h + 2 * pad, w + 2 * pad
    out = np.empty((n, h, w), dtype=np.float64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rad = [math.radians(float(a)) for a in angles[start:stop]]
        cos = np.array([math.cos(r) for r in rad])[:, None, None]
        sin = np.array([math.sin(r) for r in rad])[:, None, None]
        src_x = cx + (cos * dx - sin * dy)
        src_y = cy + (sin * dx + cos * dy)
        x0, y0 = np.floor(src_x), np.floor(src_y)
        fx, fy = src_x - x0, src_y - y0
        padded = np.zeros((stop - start, hp, wp), dtype=images.dtype)
        padded[:, pad:pad + h, pad:pad + w] = images[start:stop]
        flat = padded.reshape(-1)  # [n * hp * wp]: gather the four neighbours by flat index
        i00 = (np.arange(stop - start)[:, None, None] * (hp * wp)
               + (y0.astype(np.int64) + pad) * wp + (x0.astype(np.int64) + pad))
        top = (1.0 - fx) * flat[i00] + fx * flat[i00 + 1]
        bottom = (1.0 - fx) * flat[i00 + wp] + fx * flat[i00 + wp + 1]
        out[start:stop] = (1.0 - fy) * top + fy * bottom
    return out


def regenerate_rotated_mnist(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                             test_labels: np.ndarray, *, seed: int = REGEN_SEED) -> dict[str, np.ndarray]:
    """The regenerated ("MNIST-rot-like") recipe, version ``REGEN_VERSION`` (docs/mnist_rot.md), deterministic.

    Returns per split ``{split}_images`` uint8 (each digit transposed, then rotated), ``_labels``, ``_angles``,
    ``_source_index`` and ``_source_split`` (0 = MNIST train file, 1 = test file), plus ``recipe_version`` and
    ``seed``. Sizes: 10,000 / 2,000 / 50,000 (MNIST-rot's; the test split holds every MNIST test digit and 40,000
    train-file digits, shuffled) for genuine MNIST, proportionally fewer for a small synthetic MNIST.
    """
    n_tr, n_te = len(train_labels), len(test_labels)
    a, b, c = n_tr // 6, n_tr // 30, (2 * n_tr) // 3
    t = n_te + c
    if min(a, b) < 1:
        raise ValueError(f"cannot draw train {a} / validation {b} / test {t} from MNIST with {n_tr} train and "
                         f"{n_te} test images")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_tr)
    test_index = np.concatenate([np.arange(n_te), perm[a + b:a + b + c]])
    test_from = np.concatenate([np.ones(n_te, np.uint8), np.zeros(c, np.uint8)])
    order = rng.permutation(t)
    sources = {"train": (perm[:a], np.zeros(a, np.uint8)), "validation": (perm[a:a + b], np.zeros(b, np.uint8)),
               "test": (test_index[order], test_from[order])}
    out: dict[str, np.ndarray] = {"recipe_version": np.array(REGEN_VERSION), "seed": np.array(seed)}
    angles = {s: rng.uniform(0.0, 360.0, size=len(sources[s][0])) for s in SPLITS}
    all_images, all_labels = np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])
    for s in SPLITS:
        index, from_split = sources[s]
        rows = index + n_tr * from_split.astype(np.int64)  # test-file digits follow the train file in all_images
        rotated = rotate_images(all_images[rows].transpose(0, 2, 1), angles[s])
        out.update({f"{s}_images": np.clip(np.rint(rotated), 0, 255).astype(np.uint8),
                    f"{s}_labels": all_labels[rows].astype(np.int64), f"{s}_angles": angles[s],
                    f"{s}_source_index": index.astype(np.int64), f"{s}_source_split": from_split})
    return out


def _split_checksum(arrays: dict[str, np.ndarray], split: str) -> str:
    keys = [k for k in ("images", "labels", "angles", "source_index", "source_split") if f"{split}_{k}" in arrays]
    return array_checksum(*(arrays[f"{split}_{k}"] for k in keys))


def _cached_arrays(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from the process memo, else from the npz at ``path`` when its split checksums hold, else built, given
    a ``{split}_checksum`` per split and saved there (an unreadable or unwritable cache only warns)."""

    def load_or_build() -> dict[str, np.ndarray]:
        arrays = None
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                warnings.warn(f"ignoring unreadable cache {path} ({exc}); rebuilding it", stacklevel=4)
        if arrays is not None:
            if all(str(arrays.get(f"{s}_checksum")) == _split_checksum(arrays, s) for s in SPLITS):
                return arrays
            warnings.warn(f"cache {path} fails its checksums; rebuilding it", stacklevel=4)
        arrays = build()
        arrays.update({f"{s}_checksum": np.array(_split_checksum(arrays, s)) for s in SPLITS})
        if not writable(path.parent):
            warnings.warn(f"cache folder {path.parent} is not writable; not caching {path.name}", stacklevel=4)
            return arrays
        try:
            with atomic_write(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        except OSError as exc:
            warnings.warn(f"could not write cache {path}: {exc}", stacklevel=4)
        return arrays

    return memo(("npz", str(path.absolute())), load_or_build)


def regenerated_rotated_mnist_arrays(root: str | os.PathLike[str] | None = None,
                                     cache_dir: str | os.PathLike[str] | None = None,
                                     download: bool = True) -> tuple[dict[str, np.ndarray], MnistArrays]:
    """The regenerated splits built from the MNIST in the data dir, cached as an npz in the cache dir."""
    source = load_mnist_arrays(root, download)
    path = (resolve_cache_dir(cache_dir)
            / f"rotated_mnist_regenerated_v{REGEN_VERSION}_seed{REGEN_SEED}_{source.fingerprint[:16]}.npz")
    arrays = _cached_arrays(path, lambda: regenerate_rotated_mnist(
        source.train_images, source.train_labels, source.test_images, source.test_labels, seed=REGEN_SEED))
    return arrays, source


def _find_rot_archive(root: Path) -> Path | None:
    name = MNIST_ROT_ARCHIVE.filename
    return next((p for p in (root / "rotated_mnist" / name, root / name) if p.is_file()), None)


def _parse_amat(stream: io.TextIOBase, path: str, chunk: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 floats in [0, 1] + a label -> uint8 [N, 28, 28] (row-major, x 255, rounded) and int64 labels."""
    from tqdm import tqdm  # not tqdm.auto: a widget bar in a headless notebook run can deadlock the client

    images, labels = [], []
    with tqdm(desc=f"parsing {Path(path).name}", unit=" rows", disable=None) as bar:
        while lines := [line for _, line in zip(range(chunk), stream) if line.strip()]:
            rows = np.loadtxt(lines, dtype=np.float64, ndmin=2)
            if rows.shape[1] != 785:
                raise ChecksumError(f"{path}: rows have {rows.shape[1]} values, expected 784 pixels + 1 label")
            pixels, label = rows[:, :784], rows[:, 784]
            if pixels.min() < -1e-6 or pixels.max() > 1 + 1e-6 or np.any(label != np.round(label)) \
                    or label.min() < 0 or label.max() > 9:
                raise ChecksumError(f"{path}: pixel values outside [0, 1] or labels outside 0..9")
            images.append(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
            labels.append(label.astype(np.int64))
            bar.update(len(rows))
    if not images:
        raise ChecksumError(f"{path}: no rows")
    return np.concatenate(images), np.concatenate(labels)


def _parse_rot_archive(archive: Path) -> dict[str, np.ndarray]:
    """train = the first rows of train_valid, validation = its last ``n // 6`` rows (2,000 of 12,000), test = all."""
    parsed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with zipfile.ZipFile(archive) as zf:
        names = {Path(n).name: n for n in zf.namelist()}
        for part, member in MNIST_ROT_MEMBERS.items():
            if member not in names:
                raise ChecksumError(f"{archive}: member {member} not found (has {sorted(names)})")
            with zf.open(names[member]) as raw:
                parsed[part] = _parse_amat(io.TextIOWrapper(raw, encoding="ascii"), f"{archive}:{member}")
    images, labels = parsed["train_valid"]
    n_train = len(labels) - len(labels) // 6
    out = {"train_images": images[:n_train], "train_labels": labels[:n_train],
           "validation_images": images[n_train:], "validation_labels": labels[n_train:],
           "test_images": parsed["test"][0], "test_labels": parsed["test"][1]}
    for s in SPLITS:
        out[f"{s}_source_index"] = np.arange(len(out[f"{s}_labels"])) + (n_train if s == "validation" else 0)
    return out


def official_rotated_mnist_arrays(root: str | os.PathLike[str] | None = None,
                                  cache_dir: str | os.PathLike[str] | None = None,
                                  download: bool = True) -> tuple[dict[str, np.ndarray], Path]:
    """The MNIST-rot archive (``<root>/rotated_mnist/`` or ``<root>/``), md5-verified, parsed once and cached."""
    root_dir, remote = data_dir(root), MNIST_ROT_ARCHIVE
    archive = _find_rot_archive(root_dir)
    if archive is None:
        can_write = writable(root_dir / "rotated_mnist")
        try:
            archive = fetch(remote, root_dir / "rotated_mnist", search=[root_dir], download=download and can_write)
        except MissingFileError as exc:
            read_only = download and not can_write
            note = f"\nThe data dir {root_dir} is read-only, so nothing was downloaded." if read_only else ""
            raise MissingFileError(f"{exc}{note}\nWithout the archive, rotated_mnist(source='regenerated') builds an "
                                   f"MNIST-rot-like set from genuine MNIST.") from None
    memo(("verified", *file_key(archive), remote.checksum), lambda: verify(archive, remote.checksum, remote.algo))
    path = resolve_cache_dir(cache_dir) / f"rotated_mnist_official_{remote.checksum[:16]}.npz"
    return _cached_arrays(path, lambda: _parse_rot_archive(archive)), archive


def rotated_mnist(split: str, source: str = "auto", root: str | os.PathLike[str] | None = None,
                  fraction: float = 1.0, digits: Sequence[int] | None = None, normalize: bool = True,
                  cache_dir: str | os.PathLike[str] | None = None, *, transform: Transform | None = None,
                  download: bool = True) -> ImageDataset:
    """Rotated MNIST: train 10,000 / validation 2,000 / test 50,000 digits at uniformly random angles.

    ``source``: ``"official"``, the MNIST-rot archive in ``<root>/`` or ``<root>/rotated_mnist/`` (downloaded there
    when absent, ``download`` and writable; ``.source_indices`` are its amat rows); ``"regenerated"``, rebuilt from
    the data dir's MNIST (``.angles``, ``.source_indices``, ``.source_split`` record each digit's origin);
    ``"auto"``, official when the archive is present. ``.indices`` are rows of the full split. ``digits`` keeps those
    labels in every split, relabelled 0..k-1 in the given order; then ``fraction`` (train split only) keeps a seeded
    ``int(n * fraction)`` of them, as the original did. Pixels x / 255, then mean 0.1307 / std 0.3081 when
    ``normalize``.
    """
    digits = check_args(split, fraction, digits)
    if source not in ("auto", "official", "regenerated"):
        raise ValueError(f"unknown source {source!r}: expected 'auto', 'official' or 'regenerated'")
    root_dir = data_dir(root)
    if source == "auto":
        source = "official" if _find_rot_archive(root_dir) is not None else "regenerated"
    info: dict[str, Any]
    if source == "official":
        arrays, archive = official_rotated_mnist_arrays(root, cache_dir, download)
        info = {"label": "MNIST-rot (Larochelle et al. 2007)", "recipe_version": None, "archive": str(archive),
                "archive_md5": MNIST_ROT_ARCHIVE.checksum}
    else:
        try:
            arrays, mnist_source = regenerated_rotated_mnist_arrays(root, cache_dir, download)
        except MissingFileError as exc:
            remote = MNIST_ROT_ARCHIVE
            raise MissingFileError(f"Rotated MNIST is regenerated from genuine MNIST when the official archive is "
                                   f"absent, and MNIST is missing too.\n{exc}\nThe official MNIST-rot archive is "
                                   f"{remote.filename} ({remote.algo} {remote.checksum}) from {remote.url}; put it "
                                   f"in {root_dir / 'rotated_mnist'} or {root_dir}.") from exc
        info = {"label": "MNIST-rot-like (regenerated)", "recipe_version": int(arrays["recipe_version"]),
                "seed": int(arrays["seed"]), "mnist_source": mnist_source.source,
                "mnist_fingerprint": mnist_source.fingerprint}
    info.update({"split_sizes": {s: int(len(arrays[f"{s}_labels"])) for s in SPLITS},
                 "split_checksum": str(arrays[f"{split}_checksum"])})
    labels = arrays[f"{split}_labels"]
    ds = mnist_split(arrays[f"{split}_images"], labels, np.arange(len(labels)), split, digits, fraction,
                     name="rotated_mnist", source=source, normalize=normalize, transform=transform, info=info)
    ds.source_indices = arrays[f"{split}_source_index"][ds.indices]
    if source == "regenerated":
        ds.angles = arrays[f"{split}_angles"][ds.indices]
        ds.source_split = arrays[f"{split}_source_split"][ds.indices]
    return ds
