"""Upright MNIST: the four official idx files, checked against their md5s, with a held-out validation split."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from gevit_lib.files import ChecksumError, MissingFileError, RemoteFile, data_dir, fetch

from .dataset import ImageDataset, Transform, array_checksum, check_args, file_key, memo, select, writable

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
MNIST_BACKGROUND = (0.0 - MNIST_MEAN[0]) / MNIST_STD[0]  # black, in normalised space
MNIST_VALIDATION_SEED = 0  # np.random.default_rng(0) picks the MNIST validation images


class UnverifiedDataWarning(UserWarning):
    """A data file is readable but cannot be checked against the official checksum (e.g. a smaller MNIST)."""


@dataclass(frozen=True)
class IdxSpec:
    """One official MNIST file: md5 of the decompressed content, md5 of the official .gz, entry count, ndim."""

    md5: str
    gz_md5: str
    count: int
    ndim: int


MNIST_FILES: dict[str, IdxSpec] = {
    "train-images-idx3-ubyte": IdxSpec("6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                       60000, 3),
    "train-labels-idx1-ubyte": IdxSpec("a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432",
                                       60000, 1),
    "t10k-images-idx3-ubyte": IdxSpec("2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3",
                                      10000, 3),
    "t10k-labels-idx1-ubyte": IdxSpec("27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c",
                                      10000, 1),
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_FOLDERS = ("mnist", "MNIST/raw")  # in the data dir


def _load_mnist_file(path: Path, name: str) -> tuple[np.ndarray, bool]:
    """The IDX file (plain or .gz) of MNIST's ``name`` as a read-only uint8 array, and whether it was md5-verified
    (only full-size files have official md5s); ChecksumError when it is malformed or fails the md5."""
    spec = MNIST_FILES[name]
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ChecksumError(f"{path}: cannot decompress ({exc}); the file is corrupt or truncated") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ChecksumError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    if ndim != spec.ndim:
        raise ChecksumError(f"{path}: IDX header has {ndim} dimensions, expected {spec.ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ChecksumError(f"{path}: truncated inside the IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ChecksumError(f"{path}: {what}: the IDX header {dims} needs {expected} bytes, the (decompressed) file "
                            f"has {len(raw)}; delete it and download it again")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if spec.ndim == 3 and arr.shape[1:] != (28, 28):
        raise ChecksumError(f"{path}: images are {arr.shape[1:]}, MNIST images are 28x28")
    if arr.shape[0] == spec.count:
        got = hashlib.md5(raw).hexdigest()
        if got != spec.md5:
            raise ChecksumError(f"{path}: md5 of the decompressed content is {got}, the official {name} has "
                                f"{spec.md5}. The file is corrupt or not MNIST; delete it and download it again.")
    arr.setflags(write=False)
    return arr, arr.shape[0] == spec.count


def _find_mnist_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """The files found (plain or .gz) and the names missing."""
    found = {name: next((root / folder / f for folder in MNIST_FOLDERS for f in (name, name + ".gz")
                         if (root / folder / f).is_file()), None) for name in MNIST_FILES}
    return {n: p for n, p in found.items() if p is not None}, [n for n, p in found.items() if p is None]


def _mnist_missing_error(root: Path, missing: list[str], reason: str) -> MissingFileError:
    lines = [f"MNIST files missing: {', '.join(missing)}{reason}.",
             f"Looked in {' and '.join(str(root / f) for f in MNIST_FOLDERS)} for each name, plain or with '.gz'.",
             "Needed files (md5 of the decompressed file; md5 of the official .gz; URL):"]
    lines += [f"  {name}  {spec.md5}  {spec.gz_md5}  {MNIST_MIRRORS[0]}{name}.gz (mirror {MNIST_MIRRORS[1]}{name}.gz)"
              for name, spec in MNIST_FILES.items()]
    lines.append(f"Put them (gzipped or not) in {root / 'mnist'} or {root / 'MNIST' / 'raw'}, or point "
                 f"GEVIT_DATA_DIR at a folder holding them; download=True fetches the .gz files into "
                 f"{root / 'mnist'}.")
    return MissingFileError("\n".join(lines))


def _download_mnist(root: Path, names: list[str]) -> None:
    """Fetch each ``<name>.gz`` into ``<root>/mnist`` (md5-checked, with timeout and retries), mirror by mirror."""
    for name in names:
        for k, mirror in enumerate(MNIST_MIRRORS):
            try:
                fetch(RemoteFile(f"{name}.gz", f"{mirror}{name}.gz", MNIST_FILES[name].gz_md5, "md5"), root / "mnist")
                break
            except MissingFileError:
                if k == len(MNIST_MIRRORS) - 1:
                    raise


@dataclass
class MnistArrays:
    """The four MNIST files as uint8 arrays (read-only), whether all four passed the official md5 check, paths."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    verified: bool
    paths: dict[str, str]

    @property
    def source(self) -> str:
        """"official" when all four files carry the published md5s, else "unverified" (e.g. synthetic files)."""
        return "official" if self.verified else "unverified"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the four arrays (names the regenerated cache, so other inputs never reuse it)."""
        return array_checksum(self.train_images, self.train_labels, self.test_images, self.test_labels)


def load_mnist_arrays(root: str | os.PathLike[str] | None = None, download: bool = True) -> MnistArrays:
    """The four MNIST idx files, plain or ``.gz``, from ``<root>/mnist/`` or ``<root>/MNIST/raw/`` (cached per process).

    Full-size files must match the official md5s (else ChecksumError); smaller ones (synthetic MNIST) load as
    ``source == "unverified"`` with an ``UnverifiedDataWarning``. Absent files are downloaded into ``<root>/mnist``
    when ``download`` and the data dir is writable; otherwise MissingFileError names files, md5s, URLs and folders.
    """
    root_dir = data_dir(root)
    paths, missing = _find_mnist_files(root_dir)
    if missing:
        if not download:
            raise _mnist_missing_error(root_dir, missing, " (download disabled)")
        if not writable(root_dir):
            raise _mnist_missing_error(root_dir, missing, f" (data dir {root_dir} is read-only, not downloading)")
        try:
            _download_mnist(root_dir, missing)
        except (OSError, ChecksumError) as exc:
            raise _mnist_missing_error(root_dir, missing, f" (download failed: {exc})") from exc
        paths, missing = _find_mnist_files(root_dir)
        if missing:
            raise _mnist_missing_error(root_dir, missing, " (not found after download)")
    return memo(("mnist", *(file_key(p) for p in paths.values())), lambda: _read_mnist(paths))


def _read_mnist(paths: dict[str, Path]) -> MnistArrays:
    loaded = {n: memo(("idx", *file_key(p)), lambda: _load_mnist_file(p, n)) for n, p in paths.items()}
    arrays = MnistArrays(
        train_images=loaded["train-images-idx3-ubyte"][0], train_labels=loaded["train-labels-idx1-ubyte"][0],
        test_images=loaded["t10k-images-idx3-ubyte"][0], test_labels=loaded["t10k-labels-idx1-ubyte"][0],
        verified=all(v for _, v in loaded.values()), paths={n: str(p) for n, p in paths.items()})
    smaller = [f"{paths[n]} holds {len(a):,} entries, the official {n} {MNIST_FILES[n].count:,} (md5 "
               f"{MNIST_FILES[n].md5})" for n, (a, verified) in loaded.items() if not verified]
    if smaller:
        warnings.warn("MNIST files smaller than the official ones cannot be checked against the official md5s and "
                      "load as 'unverified' (fine for synthetic test data; results are not comparable with the "
                      "post's):\n  " + "\n  ".join(smaller), UnverifiedDataWarning, stacklevel=2)
    for part in ("train", "test"):
        images, labels = getattr(arrays, f"{part}_images"), getattr(arrays, f"{part}_labels")
        if len(images) != len(labels):
            raise ChecksumError(f"MNIST {part}: {len(images)} images but {len(labels)} labels ({paths})")
        if labels.size and labels.max() > 9:
            raise ChecksumError(f"MNIST {part}: label {labels.max()} out of range 0..9 ({paths})")
    return arrays


def mnist_validation_rows(n_train: int) -> np.ndarray:
    """Sorted rows of the MNIST train file held out for validation: a seeded ``n_train // 30`` (2,000 of 60,000)."""
    n_val = n_train // 30
    if n_val == 0:
        raise ValueError(f"the MNIST train file has {n_train} images; at least 30 are needed for a validation split")
    return np.sort(np.random.default_rng(MNIST_VALIDATION_SEED).permutation(n_train)[:n_val])


def mnist_split(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, split: str, digits: tuple[int, ...] | None,
                fraction: float, *, name: str, source: str, normalize: bool, transform: Transform | None,
                info: dict[str, Any]) -> ImageDataset:
    """The ``rows`` of ``images`` kept by ``select`` (``fraction`` applies to the train split only) as an MNIST
    ImageDataset; ``.indices`` are the kept ``rows``."""
    applied = fraction if split == "train" else 1.0
    keep, new_labels = select(labels[rows], digits, applied)
    info = {**info, "fraction": applied, "digits": list(digits) if digits is not None else None}
    return ImageDataset(images[rows[keep]], new_labels, name=name, split=split, source=source, indices=rows[keep],
                        num_classes=len(digits) if digits is not None else 10, mean=MNIST_MEAN, std=MNIST_STD,
                        normalize=normalize, transform=transform, info=info)


def mnist(split: str, root: str | os.PathLike[str] | None = None, transform: Transform | None = None,
          download: bool = True, *, normalize: bool = True, fraction: float = 1.0,
          digits: Sequence[int] | None = None) -> ImageDataset:
    """Upright MNIST: validation = 2,000 train-file images (``mnist_validation_rows``), train = the other 58,000 in
    file order, test = the 10,000 test images. (The post's ViT trained on all 60,000 and validated on 2,000 test
    images; this keeps the test set untouched.)

    ``.indices`` are rows of the train or test file. ``normalize``, ``digits``, ``fraction``: as in ``rotated_mnist``.
    """
    digits = check_args(split, fraction, digits)
    arrays = load_mnist_arrays(root, download)
    n_train = len(arrays.train_labels)
    if split == "test":
        images, labels, rows = arrays.test_images, arrays.test_labels, np.arange(len(arrays.test_labels))
    else:
        images, labels = arrays.train_images, arrays.train_labels
        val_rows = mnist_validation_rows(n_train)
        rows = val_rows if split == "validation" else np.setdiff1d(np.arange(n_train), val_rows)
    info = {"split_sizes": {"train": n_train - n_train // 30, "validation": n_train // 30,
                            "test": len(arrays.test_labels)},
            "validation_seed": MNIST_VALIDATION_SEED, "files": arrays.paths}
    return mnist_split(images, labels, rows, split, digits, fraction, name="mnist", source=arrays.source,
                       normalize=normalize, transform=transform, info=info)
