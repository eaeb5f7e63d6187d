"""The post's datasets with explicit train / validation / test splits: MNIST, rotated MNIST and PatchCamelyon.

Every loader returns a torch ``Dataset`` of ``(image float32 [C, H, W], label int64)``. Split names are
``"train"``, ``"validation"`` and ``"test"``; model selection (early stopping, hyper-parameters) only ever uses
``"validation"``, ``"test"`` gives the final number. Files are found through ``gevit_lib.files.data_dir`` (argument,
then ``$GEVIT_DATA_DIR``, then ``./data``) and are only ever read there: parsed or regenerated arrays go to a
separate, writable cache folder (see ``resolve_cache_dir``). Each dataset records where it came from
(``.source``, ``.describe()``) so that results can say which data produced them.

Rotated MNIST exists in two forms: the genuine MNIST-rot archive of Larochelle et al. (2007) when present
(``source="official"``), otherwise a deterministic, cached re-creation from genuine MNIST with the same split sizes
(``source="regenerated"``, "MNIST-rot-like"); compare the latter with published numbers only loosely.

The bilinear rotation of the regenerated set is written here in float64 numpy (instead of torchvision or scipy)
so that the cached arrays are bit-identical across machines and library versions: a test pins their sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from gevit_lib.files import ChecksumError, MissingFileError, RemoteFile, atomic_write, data_dir, fetch, verify

__all__ = [
    "SPLITS",
    "ImageDataset",
    "PCamDataset",
    "MnistArrays",
    "mnist",
    "rotated_mnist",
    "pcam",
    "load_mnist_arrays",
    "mnist_validation_rows",
    "regenerated_rotated_mnist_arrays",
    "official_rotated_mnist_arrays",
    "read_idx",
    "rotate_images",
    "regenerate_rotated_mnist",
    "regenerated_sizes",
    "array_checksum",
    "resolve_cache_dir",
    "make_synthetic_mnist",
    "write_fake_pcam",
    "clear_caches",
]

SPLITS = ("train", "validation", "test")
Transform = Callable[[torch.Tensor], torch.Tensor]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
MNIST_BACKGROUND = (0.0 - MNIST_MEAN[0]) / MNIST_STD[0]  # black, in normalised space
PCAM_MEAN, PCAM_STD = (0.701, 0.538, 0.692), (0.235, 0.277, 0.213)

FRACTION_SEED = 0  # the original: torch.manual_seed(0); torch.randperm(n)[:int(n * fraction)]
MNIST_VALIDATION_SEED = 0  # np.random.default_rng(0) picks the MNIST validation images
REGEN_SEED = 0  # np.random.default_rng(0) drives the regenerated rotated-MNIST recipe
REGEN_VERSION = 1  # bump when the recipe changes; part of the cache file name


@dataclass(frozen=True)
class IdxSpec:
    """One official MNIST file: md5 of the decompressed content, md5 of the official .gz, entry count."""

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

MNIST_ROT_ARCHIVE = RemoteFile(
    "mnist_rotation_new.zip",
    "http://www.iro.umontreal.ca/~lisa/icml2007data/mnist_rotation_new.zip",
    "0f9a947ff3d30e95cd685462cbf3b847",
    "md5",
)
MNIST_ROT_MEMBERS = {
    "train_valid": "mnist_all_rotation_normalized_float_train_valid.amat",
    "test": "mnist_all_rotation_normalized_float_test.amat",
}

PCAM_FILES = {
    "train": ("camelyonpatch_level_2_split_train_x.h5", "camelyonpatch_level_2_split_train_y.h5"),
    "validation": ("camelyonpatch_level_2_split_valid_x.h5", "camelyonpatch_level_2_split_valid_y.h5"),
    "test": ("camelyonpatch_level_2_split_test_x.h5", "camelyonpatch_level_2_split_test_y.h5"),
}
PCAM_SOURCE = (
    "torchvision.datasets.PCAM(root, split, download=True) (needs gdown), or the .h5.gz files of "
    "https://zenodo.org/record/2546921 (github.com/basveeling/pcam), gunzipped"
)

# Per-process caches: verified files (keyed by path, size, mtime) and parsed / regenerated arrays.
_IDX_CACHE: dict[tuple[str, int, int], tuple[np.ndarray, bool]] = {}
_VERIFIED: set[tuple[str, int, int, str]] = set()
_MNIST_CACHE: dict[tuple, MnistArrays] = {}
_ROT_CACHE: dict[str, dict[str, np.ndarray]] = {}


def clear_caches() -> None:
    """Forget every per-process cache (verified files, parsed and regenerated arrays)."""
    _IDX_CACHE.clear()
    _VERIFIED.clear()
    _MNIST_CACHE.clear()
    _ROT_CACHE.clear()


# ----------------------------------------------------------------------------------------------------------------
# Datasets


class _NormalizedImages(Dataset):
    """Shared part: uint8 [H, W] or [H, W, C] pixels -> float32 [C, H, W] in [0, 1], optionally normalised."""

    name: str
    split: str
    source: str
    num_classes: int

    def __init__(self, mean: Sequence[float], std: Sequence[float], normalize: bool,
                 transform: Transform | None) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = normalize
        self.transform = transform
        self._info: dict[str, Any] = {}
        self._described: dict[str, Any] | None = None

    def _to_float(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W], the same float32 ops as ToTensor + Normalize."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        if self.normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            x = x.sub_(mean).div_(std)
        return x

    def _item(self, pixels: np.ndarray, label: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    @property
    def info(self) -> dict[str, Any]:
        return self.describe()


class ImageDataset(_NormalizedImages):
    """An in-memory split: ``images`` uint8 [N, H, W] (or [N, H, W, C]) and ``labels`` int64 [N].

    Items are ``(float32 [C, H, W], int64 label)``: pixels / 255, then ``(x - mean) / std`` when ``normalize``,
    then ``transform`` (a function of the float tensor). ``indices`` [N] gives each item's row in the array the
    split was taken from (documented per loader); ``source`` names the data source.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str, split: str, source: str,
                 indices: np.ndarray, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 normalize: bool = True, transform: Transform | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(mean, std, normalize, transform)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
        if len(labels) != len(images) or len(indices) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels and {len(indices)} indices")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name, self.split, self.source, self.num_classes = name, split, source, num_classes
        self.angles: np.ndarray | None = None  # degrees, counter-clockwise (regenerated rotated MNIST only)
        self.source_indices: np.ndarray | None = None  # row in the source file (rotated MNIST)
        self.source_split: np.ndarray | None = None  # 0 = MNIST train file, 1 = MNIST test file (regenerated)
        self._info = dict(info or {})

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._item(self.images[index], self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once: float32 [N, C, H, W] (scaled and normalised as items) and int64 labels [N]."""
        if self.transform is not None:
            raise ValueError("tensors() cannot apply the per-item transform; iterate the dataset instead")
        return self._to_float(self.images), torch.from_numpy(self.labels.copy())

    def _checksum(self) -> str:
        return array_checksum(self.images, self.labels)


class PCamDataset(_NormalizedImages):
    """PatchCamelyon split read lazily from torchvision's h5 files (each worker opens its own handle)."""

    def __init__(self, images_file: Path, labels: np.ndarray, indices: np.ndarray, *, split: str,
                 normalize: bool, transform: Transform | None, info: dict[str, Any]) -> None:
        super().__init__(PCAM_MEAN, PCAM_STD, normalize, transform)
        self.images_file = images_file
        self.labels = labels.astype(np.int64)
        self.indices = indices.astype(np.int64)
        self.name, self.split, self.source, self.num_classes = "pcam", split, "torchvision-h5", 2
        self._info = info
        self._handle: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _images(self) -> Any:
        import h5py

        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = h5py.File(self.images_file, "r"), os.getpid()
        return self._handle["x"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._item(self._images()[int(self.indices[index])], self.labels[index])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None
        return state

    def _checksum(self) -> str:
        return array_checksum(self.indices, self.labels)  # of the selection; the h5 images are not hashed


# ----------------------------------------------------------------------------------------------------------------
# Small shared helpers


def _check_split(split: str) -> str:
    if split not in SPLITS:
        hint = " (use 'validation')" if split in ("val", "valid", "dev") else ""
        raise ValueError(f"unknown split {split!r}{hint}: expected one of 'train', 'validation', 'test'; "
                         f"model selection must only use 'validation'")
    return split


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def _check_digits(digits: Sequence[int] | None) -> tuple[int, ...] | None:
    if digits is None:
        return None
    out = tuple(int(d) for d in digits)
    if not out or len(set(out)) != len(out) or not all(0 <= d <= 9 for d in out):
        raise ValueError(f"digits must be distinct labels in 0..9, got {list(out)}")
    return out


def array_checksum(*arrays: np.ndarray) -> str:
    """sha256 over each array's dtype, shape and C-order bytes (stable across machines for fixed dtypes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _writable(path: Path) -> bool:
    """True when ``path`` (or its nearest existing parent) may be written: permission bits, not only root's access."""
    p = Path(path).absolute()
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK) and bool(p.stat().st_mode & 0o222)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None,
                      root: str | os.PathLike[str] | None = None) -> Path:
    """Cache folder for parsed / regenerated arrays.

    ``cache_dir`` if given, else ``$GEVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gevit_companion`` (``~/.cache/...``).
    Data folders are never written to (they may be shared and read-only).
    """
    del root  # the cache never lives in the data folder
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GEVIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "gevit_companion"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if not _writable(path.parent):
        warnings.warn(f"cache folder {path.parent} is not writable; not caching {path.name}", stacklevel=3)
        return
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as exc:
        warnings.warn(f"could not write cache {path}: {exc}", stacklevel=3)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        warnings.warn(f"ignoring unreadable cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None


def _select(labels: np.ndarray, digits: Sequence[int] | None, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows to keep and their labels: ``digits`` filter (relabelled 0..k-1 in the given order), then ``fraction``.

    The fraction subset is the original's: ``torch.manual_seed(0); torch.randperm(n)[:int(n * fraction)]`` (done
    with a private generator, so the global torch RNG is untouched), in that permuted order.
    """
    rows = np.arange(len(labels))
    labels = np.asarray(labels, dtype=np.int64)
    digits = _check_digits(digits)
    if digits is not None:
        mapping = np.full(10, -1, dtype=np.int64)
        mapping[list(digits)] = np.arange(len(digits))
        keep = mapping[labels] >= 0
        rows, labels = rows[keep], mapping[labels[keep]]
    _check_fraction(fraction)
    if fraction < 1.0:
        n = int(len(rows) * fraction)
        if n == 0:
            raise ValueError(f"fraction {fraction} of {len(rows)} images keeps none")
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(FRACTION_SEED))[:n].numpy()
        rows, labels = rows[perm], labels[perm]
    return rows, labels


# ----------------------------------------------------------------------------------------------------------------
# MNIST


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (plain or .gz) into a uint8 array, checking the header against the file length.

    Raises ChecksumError for an unreadable gzip stream, a bad magic number or a length that disagrees with the
    header (truncation or trailing bytes).
    """
    arr, _ = _read_idx_raw(Path(path), expected_ndim)
    return arr


def _read_idx_raw(path: Path, expected_ndim: int | None) -> tuple[np.ndarray, bytes]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ChecksumError(f"{path}: cannot decompress ({exc}); the file is corrupt or truncated") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ChecksumError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ChecksumError(f"{path}: IDX header has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ChecksumError(f"{path}: truncated inside the IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ChecksumError(f"{path}: {what}: the IDX header {dims} needs {expected} bytes, the (decompressed) file "
                            f"has {len(raw)}; delete it and download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims), raw


def _load_mnist_file(path: Path, name: str) -> tuple[np.ndarray, bool]:
    """Parsed file and whether it was md5-verified (only full-size files have official md5s to check)."""
    key = _file_key(path)
    if key in _IDX_CACHE:
        return _IDX_CACHE[key]
    spec = MNIST_FILES[name]
    arr, raw = _read_idx_raw(path, spec.ndim)
    if spec.ndim == 3 and arr.shape[1:] != (28, 28):
        raise ChecksumError(f"{path}: images are {arr.shape[1:]}, MNIST images are 28x28")
    verified = False
    if arr.shape[0] == spec.count:
        got = hashlib.md5(raw).hexdigest()
        if got != spec.md5:
            raise ChecksumError(f"{path}: md5 of the decompressed content is {got}, the official {name} has "
                                f"{spec.md5}. The file is corrupt or not MNIST; delete it and download it again.")
        verified = True
    arr.setflags(write=False)
    _IDX_CACHE[key] = (arr, verified)
    return arr, verified


def _mnist_folders(root: Path) -> list[Path]:
    return [root / "mnist", root / "MNIST" / "raw"]


def _find_mnist_files(root: Path) -> dict[str, Path | None]:
    found: dict[str, Path | None] = {}
    for name in MNIST_FILES:
        found[name] = next((folder / f for folder in _mnist_folders(root) for f in (name, name + ".gz")
                            if (folder / f).is_file()), None)
    return found


def _mnist_missing_error(root: Path, missing: list[str], reason: str) -> MissingFileError:
    lines = [f"MNIST files missing: {', '.join(missing)}{reason}.",
             f"Looked in {' and '.join(str(f) for f in _mnist_folders(root))} for each name, plain or with '.gz'.",
             "Needed files (md5 of the decompressed file; md5 of the official .gz; URL):"]
    for name, spec in MNIST_FILES.items():
        lines.append(f"  {name}  {spec.md5}  {spec.gz_md5}  {MNIST_MIRRORS[0]}{name}.gz "
                     f"(mirror {MNIST_MIRRORS[1]}{name}.gz)")
    lines.append(f"Put them (gzipped or not) in {root / 'mnist'} or {root / 'MNIST' / 'raw'}, or point "
                 f"GEVIT_DATA_DIR at a folder holding them; download=True fetches them with torchvision.")
    return MissingFileError("\n".join(lines))


def _download_mnist(root: Path) -> None:
    from torchvision.datasets import MNIST

    MNIST(str(root), train=True, download=True)


@dataclass
class MnistArrays:
    """The four MNIST files as uint8 arrays (read-only), whether all four passed the official md5 check, paths."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    verified: bool
    paths: dict[str, str]
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        """"official" when all four files carry the published md5s, else "unverified" (e.g. synthetic files)."""
        return "official" if self.verified else "unverified"

    @property
    def fingerprint(self) -> str:
        """sha256 of the four arrays (names the regenerated cache, so other inputs never reuse it)."""
        if self._fingerprint is None:
            self._fingerprint = array_checksum(self.train_images, self.train_labels, self.test_images,
                                               self.test_labels)
        return self._fingerprint


def load_mnist_arrays(root: str | os.PathLike[str] | None = None, download: bool = True) -> MnistArrays:
    """Read (and verify) the four MNIST idx files from ``<root>/mnist/`` or ``<root>/MNIST/raw/``.

    Each file may be plain or ``.gz``; the data folder is only read. Every file's IDX header is checked against
    its length (truncation); files with the official entry count (60,000 / 10,000) must also match the official
    md5 of the decompressed content, so corruption raises ChecksumError. Smaller files (e.g. from
    ``make_synthetic_mnist``) have no official md5 and load as ``source == "unverified"``. Results are cached per
    process. Absent files are downloaded with torchvision into ``<root>/MNIST/raw`` when ``download`` and the
    data dir is writable; otherwise MissingFileError names the files, md5s, URLs and where to put them.
    """
    root_dir = data_dir(root)
    found = _find_mnist_files(root_dir)
    missing = [n for n, p in found.items() if p is None]
    if missing:
        if not download:
            raise _mnist_missing_error(root_dir, missing, " (download disabled)")
        if not _writable(root_dir):
            raise _mnist_missing_error(root_dir, missing, f" (data dir {root_dir} is read-only, not downloading)")
        try:
            _download_mnist(root_dir)
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError ... when offline
            raise _mnist_missing_error(root_dir, missing, f" (download failed: {exc})") from exc
        found = _find_mnist_files(root_dir)
        missing = [n for n, p in found.items() if p is None]
        if missing:
            raise _mnist_missing_error(root_dir, missing, " (not found after download)")
    paths = {n: p for n, p in found.items() if p is not None}
    key = tuple(_file_key(p) for p in paths.values())
    if key in _MNIST_CACHE:
        return _MNIST_CACHE[key]
    loaded = {n: _load_mnist_file(p, n) for n, p in paths.items()}
    arrays = MnistArrays(
        train_images=loaded["train-images-idx3-ubyte"][0], train_labels=loaded["train-labels-idx1-ubyte"][0],
        test_images=loaded["t10k-images-idx3-ubyte"][0], test_labels=loaded["t10k-labels-idx1-ubyte"][0],
        verified=all(v for _, v in loaded.values()), paths={n: str(p) for n, p in paths.items()})
    for part in ("train", "test"):
        images, labels = getattr(arrays, f"{part}_images"), getattr(arrays, f"{part}_labels")
        if len(images) != len(labels):
            raise ChecksumError(f"MNIST {part}: {len(images)} images but {len(labels)} labels ({paths})")
        if labels.size and labels.max() > 9:
            raise ChecksumError(f"MNIST {part}: label {labels.max()} out of range 0..9 ({paths})")
    _MNIST_CACHE[key] = arrays
    return arrays


def mnist_validation_rows(n_train: int) -> np.ndarray:
    """Sorted rows of the MNIST train file held out for validation: ``n_train // 30`` of them (2,000 of 60,000),
    drawn with ``np.random.default_rng(MNIST_VALIDATION_SEED).permutation(n_train)``."""
    n_val = n_train // 30
    if n_val == 0:
        raise ValueError(f"the MNIST train file has {n_train} images; at least 30 are needed for a validation split")
    return np.sort(np.random.default_rng(MNIST_VALIDATION_SEED).permutation(n_train)[:n_val])


def mnist(split: str, root: str | os.PathLike[str] | None = None, transform: Transform | None = None,
          download: bool = True, *, normalize: bool = True, fraction: float = 1.0,
          digits: Sequence[int] | None = None) -> ImageDataset:
    """Upright MNIST with a held-out validation split.

    - ``"validation"``: 2,000 images of the MNIST train file (``n_train // 30``), drawn with
      ``np.random.default_rng(0)`` (``mnist_validation_rows``);
    - ``"train"``: the other 58,000 train-file images, in file order;
    - ``"test"``: the 10,000 MNIST test images.
    (The post's upright-MNIST ViT used all 60,000 for training and 2,000 *test* images as validation; this keeps
    the test set untouched instead.) ``.indices`` are rows of the MNIST train file (train / validation) or test
    file (test). Pixels: x / 255, then mean 0.1307 / std 0.3081 when ``normalize``; raw uint8 pixels stay in
    ``.images`` [N, 28, 28] with ``.labels``. ``digits`` keeps those labels, relabelled 0..k-1 in the given order;
    ``fraction`` (train split only) keeps a seeded subset, as in ``rotated_mnist``. Files: ``load_mnist_arrays``.
    """
    _check_split(split)
    _check_fraction(fraction)
    digits = _check_digits(digits)
    arrays = load_mnist_arrays(root, download)
    if split == "test":
        images, labels, rows = arrays.test_images, arrays.test_labels, np.arange(len(arrays.test_labels))
    else:
        val_rows = mnist_validation_rows(len(arrays.train_labels))
        if split == "validation":
            rows = val_rows
        else:
            mask = np.ones(len(arrays.train_labels), dtype=bool)
            mask[val_rows] = False
            rows = np.flatnonzero(mask)
        images, labels = arrays.train_images, arrays.train_labels
    n_train = len(arrays.train_labels)
    split_sizes = {"train": n_train - n_train // 30, "validation": n_train // 30, "test": len(arrays.test_labels)}
    keep, new_labels = _select(labels[rows], digits, fraction if split == "train" else 1.0)
    rows = rows[keep]
    info = {"split_sizes": split_sizes, "validation_seed": MNIST_VALIDATION_SEED,
            "fraction": fraction if split == "train" else 1.0, "files": arrays.paths,
            "digits": list(digits) if digits is not None else None}
    return ImageDataset(images[rows], new_labels, name="mnist", split=split, source=arrays.source, indices=rows,
                        num_classes=len(digits) if digits is not None else 10, mean=MNIST_MEAN, std=MNIST_STD,
                        normalize=normalize, transform=transform, info=info)


def make_synthetic_mnist(root: str | os.PathLike[str], n_train: int = 600, n_test: int = 100,
                         seed: int = 0) -> Path:
    """Write fake MNIST (``<root>/mnist/*-idx?-ubyte.gz``, genuine IDX format) for tests without real data.

    Each class is a fixed random stroke pattern, shifted by up to 2 pixels and scaled in intensity per image, so
    the classes are learnable but not rotation symmetric. The counts must differ from the official 60,000 /
    10,000: files of official size are checked against the official md5s (see ``load_mnist_arrays``).
    Returns the folder written.
    """
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

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        padded = np.pad(templates, ((0, 0), (2, 2), (2, 2)))
        shifts = rng.integers(0, 5, size=(n, 2))
        scale = rng.uniform(0.7, 1.0, size=n)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            dy, dx = shifts[i]
            images[i] = np.clip(np.rint(255 * scale[i] * padded[labels[i], dy:dy + 28, dx:dx + 28]), 0, 255)
        return images, labels

    folder = Path(root) / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = draw(n)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with atomic_write(folder / f"{name}.gz") as tmp:
                tmp.write_bytes(gzip.compress(header + arr.tobytes(), mtime=0))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Rotated MNIST


def rotate_images(images: np.ndarray, angles: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Rotate each [H, W] image counter-clockwise (as displayed, rows downwards) by ``angles`` degrees.

    Same direction as ``torchvision.transforms.functional.rotate`` and ``torch.rot90(x, 1, (-2, -1))``.
    Rotation about the image centre ((H-1)/2, (W-1)/2) = (13.5, 13.5) for 28x28, by inverse mapping: output pixel
    (row, col) samples the input at col' = cx + cos*(col-cx) - sin*(row-cy), row' = cy + sin*(col-cx) +
    cos*(row-cy), bilinearly, with zeros outside. All arithmetic is float64 in a fixed order, with cos / sin from
    Python's ``math`` module, so results are reproducible across machines. Returns float64 [N, H, W].
    """
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
        flat = padded.reshape(-1)
        i00 = (np.arange(stop - start)[:, None, None] * (hp * wp)
               + (y0.astype(np.int64) + pad) * wp + (x0.astype(np.int64) + pad))
        top = (1.0 - fx) * flat[i00] + fx * flat[i00 + 1]
        bottom = (1.0 - fx) * flat[i00 + wp] + fx * flat[i00 + wp + 1]
        out[start:stop] = (1.0 - fy) * top + fy * bottom
    return out


def regenerated_sizes(n_train: int, n_test: int) -> tuple[int, int, int]:
    """Split sizes of the regenerated set from an MNIST with ``n_train`` / ``n_test`` images.

    train ``n_train // 6``, validation ``n_train // 30``, test ``n_test + 2 * n_train // 3``: 10,000 / 2,000 /
    50,000 for genuine MNIST (the MNIST-rot sizes), scaled down proportionally for small synthetic MNIST.
    """
    return n_train // 6, n_train // 30, n_test + (2 * n_train) // 3


def regenerate_rotated_mnist(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                             test_labels: np.ndarray, *, seed: int = REGEN_SEED,
                             sizes: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """The regenerated ("MNIST-rot-like") recipe, version ``REGEN_VERSION``; deterministic for a given input.

    With ``rng = np.random.default_rng(seed)`` (PCG64), in this order:
    1. ``perm = rng.permutation(n_train)``: train = ``perm[:a]``, validation = ``perm[a:a+b]``, and
       ``perm[a+b:a+b+c]`` the ``c = test - n_test`` train-file digits that join the test split (all disjoint);
    2. test = all MNIST test digits followed by those ``c`` digits, reordered by ``rng.permutation(test)``;
    3. angles ``rng.uniform(0, 360, size)`` in degrees for train, then validation, then test;
    4. each digit is TRANSPOSED (the official MNIST-rot files hold transposed MNIST digits, and the published
       checkpoints were trained on them), then rotated counter-clockwise by its angle (``rotate_images``),
       rounded half-to-even (``np.rint``) and clipped to uint8.
    ``sizes`` = (train, validation, test) defaults to ``regenerated_sizes``. Returns ``{split}_images`` uint8,
    ``{split}_labels`` int64, ``{split}_angles`` float64, ``{split}_source_index`` int64 and
    ``{split}_source_split`` uint8 (0 = MNIST train file, 1 = MNIST test file) for each split, plus
    ``recipe_version`` and ``seed``.
    """
    n_tr, n_te = len(train_labels), len(test_labels)
    a, b, t = sizes if sizes is not None else regenerated_sizes(n_tr, n_te)
    c = t - n_te
    if min(a, b) < 1 or c < 0 or a + b + c > n_tr:
        raise ValueError(f"cannot draw train {a} / validation {b} / test {t} from MNIST with {n_tr} train and "
                         f"{n_te} test images (test holds all test images plus train-file images)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_tr)
    test_index = np.concatenate([np.arange(n_te), perm[a + b:a + b + c]])
    test_from = np.concatenate([np.ones(n_te, np.uint8), np.zeros(c, np.uint8)])
    order = rng.permutation(t)
    sources = {"train": (perm[:a], np.zeros(a, np.uint8)), "validation": (perm[a:a + b], np.zeros(b, np.uint8)),
               "test": (test_index[order], test_from[order])}
    out: dict[str, np.ndarray] = {"recipe_version": np.array(REGEN_VERSION), "seed": np.array(seed)}
    angles = {s: rng.uniform(0.0, 360.0, size=len(sources[s][0])) for s in SPLITS}
    for s in SPLITS:
        index, from_split = sources[s]
        in_test = from_split == 1
        digits = np.empty((len(index), *train_images.shape[1:]), dtype=np.uint8)
        labels = np.empty(len(index), dtype=np.int64)
        digits[~in_test], labels[~in_test] = train_images[index[~in_test]], train_labels[index[~in_test]]
        digits[in_test], labels[in_test] = test_images[index[in_test]], test_labels[index[in_test]]
        rotated = rotate_images(digits.transpose(0, 2, 1), angles[s])
        out[f"{s}_images"] = np.clip(np.rint(rotated), 0, 255).astype(np.uint8)
        out[f"{s}_labels"] = labels
        out[f"{s}_angles"] = angles[s]
        out[f"{s}_source_index"] = index.astype(np.int64)
        out[f"{s}_source_split"] = from_split
    return out


def _split_checksum(arrays: dict[str, np.ndarray], split: str) -> str:
    keys = [k for k in ("images", "labels", "angles", "source_index", "source_split") if f"{split}_{k}" in arrays]
    return array_checksum(*(arrays[f"{split}_{k}"] for k in keys))


def _with_checksums(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**arrays, **{f"{s}_checksum": np.array(_split_checksum(arrays, s)) for s in SPLITS}}


def _cached_arrays(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from the process cache, else from the npz at ``path`` (checksums verified), else built and saved."""
    key = str(path.absolute())
    if key in _ROT_CACHE:
        return _ROT_CACHE[key]
    arrays = _load_npz(path)
    if arrays is not None and not all(f"{s}_checksum" in arrays and str(arrays[f"{s}_checksum"])
                                      == _split_checksum(arrays, s) for s in SPLITS):
        warnings.warn(f"cache {path} fails its checksums; rebuilding it", stacklevel=3)
        arrays = None
    if arrays is None:
        arrays = _with_checksums(build())
        _save_npz(path, arrays)
    _ROT_CACHE[key] = arrays
    return arrays


def regenerated_rotated_mnist_arrays(root: str | os.PathLike[str] | None = None,
                                     cache_dir: str | os.PathLike[str] | None = None,
                                     download: bool = True) -> tuple[dict[str, np.ndarray], MnistArrays]:
    """The regenerated splits built from the MNIST in the data dir, cached as an npz in the cache dir."""
    source = load_mnist_arrays(root, download)
    path = (resolve_cache_dir(cache_dir, root)
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
    n_val = len(labels) // 6
    n_train = len(labels) - n_val
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
    root_dir = data_dir(root)
    remote = MNIST_ROT_ARCHIVE
    archive = _find_rot_archive(root_dir)
    if archive is None:
        writable = _writable(root_dir / "rotated_mnist")
        try:
            archive = fetch(remote, root_dir / "rotated_mnist", search=[root_dir], download=download and writable)
        except MissingFileError as exc:
            note = "" if writable or not download else f"\nThe data dir {root_dir} is read-only, so nothing was " \
                                                       f"downloaded."
            raise MissingFileError(f"{exc}{note}\nWithout the archive, rotated_mnist(source='regenerated') builds an "
                                   f"MNIST-rot-like set from genuine MNIST.") from None
    key = (*_file_key(archive), remote.checksum)
    if key not in _VERIFIED:
        verify(archive, remote.checksum, remote.algo)
        _VERIFIED.add(key)
    path = resolve_cache_dir(cache_dir, root) / f"rotated_mnist_official_{remote.checksum[:16]}.npz"
    return _cached_arrays(path, lambda: _parse_rot_archive(archive)), archive


def rotated_mnist(split: str, source: str = "auto", root: str | os.PathLike[str] | None = None,
                  fraction: float = 1.0, digits: Sequence[int] | None = None, normalize: bool = True,
                  cache_dir: str | os.PathLike[str] | None = None, *, transform: Transform | None = None,
                  download: bool = True) -> ImageDataset:
    """Rotated MNIST: train 10,000 / validation 2,000 / test 50,000 digits at uniformly random angles.

    ``source``:
    - ``"official"``: the MNIST-rot archive ``mnist_rotation_new.zip`` (Larochelle et al. 2007; md5
      ``0f9a947f...``) in ``<root>/`` or ``<root>/rotated_mnist/`` (downloaded there when absent, ``download``
      and writable). Rows are reshaped row-major (not transposed), scaled by 255 (the original code used 256,
      which overflows uint8 at 1.0) and rounded; train = the first 10,000 rows of train_valid, validation = its
      last 2,000 (upstream GSA-Nets discarded them), test = the 50,000 test rows. ``.source_indices``: row
      numbers in the amat file (``.angles`` is None: the archive does not record them).
    - ``"regenerated"``: ``regenerate_rotated_mnist`` applied to the genuine MNIST of the data dir (MNIST-rot-like;
      ``.angles``, ``.source_indices`` and ``.source_split`` record each digit's MNIST origin).
    - ``"auto"``: official when the archive is present, else regenerated.
    ``.indices`` are rows of the full split (before ``digits`` / ``fraction``).
    Parsed / regenerated arrays are cached as npz in ``resolve_cache_dir(cache_dir, root)``, never in the data dir.
    ``digits`` keeps those labels in every split, relabelled 0..k-1 in the given order (``(3, 8)``: 3 -> 0,
    8 -> 1); then ``fraction`` (train split only, ignored for the others as in the original) keeps
    ``int(n * fraction)`` images, ``torch.manual_seed(0); torch.randperm(n)[:n_keep]`` as the original did.
    Pixels x / 255, then mean 0.1307 / std 0.3081 when ``normalize``. ``.source`` and ``.describe()`` record the
    source, recipe version, sizes and checksums.
    """
    _check_split(split)
    _check_fraction(fraction)
    digits = _check_digits(digits)
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
        arrays, mnist_source = regenerated_rotated_mnist_arrays(root, cache_dir, download)
        info = {"label": "MNIST-rot-like (regenerated)", "recipe_version": int(arrays["recipe_version"]),
                "seed": int(arrays["seed"]), "mnist_source": mnist_source.source,
                "mnist_fingerprint": mnist_source.fingerprint}
    applied = fraction if split == "train" else 1.0
    rows, labels = _select(arrays[f"{split}_labels"], digits, applied)
    info.update({"split_sizes": {s: int(len(arrays[f"{s}_labels"])) for s in SPLITS},
                 "split_checksum": str(arrays[f"{split}_checksum"]), "fraction": applied,
                 "digits": list(digits) if digits is not None else None})
    ds = ImageDataset(arrays[f"{split}_images"][rows], labels, name="rotated_mnist", split=split, source=source,
                      indices=rows, num_classes=len(digits) if digits is not None else 10, mean=MNIST_MEAN,
                      std=MNIST_STD, normalize=normalize, transform=transform, info=info)
    ds.source_indices = arrays[f"{split}_source_index"][rows]
    if source == "regenerated":
        ds.angles = arrays[f"{split}_angles"][rows]
        ds.source_split = arrays[f"{split}_source_split"][rows]
    return ds


# ----------------------------------------------------------------------------------------------------------------
# PatchCamelyon


def _pcam_missing_error(folder: Path, missing: list[str], reason: str) -> MissingFileError:
    names = "\n".join(f"  {name}" for pair in PCAM_FILES.values() for name in pair)
    return MissingFileError(f"PCam files missing in {folder}: {', '.join(missing)}{reason}.\nThe six files "
                            f"(torchvision.datasets.PCAM layout):\n{names}\nGet them from {PCAM_SOURCE}, and put "
                            f"them in {folder} (or point GEVIT_DATA_DIR at a folder holding pcam/).")


def pcam(split: str, root: str | os.PathLike[str] | None = None, fraction: float = 1.0, normalize: bool = True,
         download: bool = False, *, transform: Transform | None = None) -> PCamDataset:
    """PatchCamelyon from torchvision's h5 files ``<root>/pcam/camelyonpatch_level_2_split_{split}_{x,y}.h5``.

    ``{split}`` is ``train``, ``valid`` or ``test`` in the file names.
    Full splits (262,144 / 32,768 / 32,768 for the real data); ``fraction`` < 1 keeps a seeded subset of the
    requested split (any split): ``int(n * fraction)`` rows of ``torch.randperm(n)`` under seed 0, as for rotated
    MNIST (the original used an unseeded ``random.sample``). Images (x: uint8 [N, 96, 96, 3]) are read lazily
    from the h5 file per item; labels (y: uint8 [N, 1, 1, 1]) are read at construction. Pixels x / 255, then
    mean (0.701, 0.538, 0.692) / std (0.235, 0.277, 0.213) when ``normalize``. The files' layout and shapes are
    checked (the multi-GB files are not hashed). Missing files raise MissingFileError naming all six; with
    ``download`` torchvision fetches the split (needs ``gdown`` and network).
    """
    import h5py

    _check_split(split)
    _check_fraction(fraction)
    folder = data_dir(root) / "pcam"
    x_name, y_name = PCAM_FILES[split]
    missing = [n for n in (x_name, y_name) if not (folder / n).is_file()]
    if missing and download:
        if not _writable(folder):
            raise _pcam_missing_error(folder, missing, " (data dir is read-only, not downloading)")
        try:
            from torchvision.datasets import PCAM

            PCAM(str(folder.parent), split={"validation": "val"}.get(split, split), download=True)
        except Exception as exc:  # gdown missing, offline, quota ...
            raise _pcam_missing_error(folder, missing, f" (download failed: {exc})") from exc
        missing = [n for n in (x_name, y_name) if not (folder / n).is_file()]
    if missing:
        raise _pcam_missing_error(folder, missing, "" if download else " (download disabled)")
    try:
        with h5py.File(folder / x_name, "r") as fx, h5py.File(folder / y_name, "r") as fy:
            x, y = fx["x"], fy["y"]
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (96, 96, 3):
                raise ChecksumError(f"{folder / x_name}: x is {x.dtype} {x.shape}, expected uint8 [N, 96, 96, 3]")
            if y.shape != (x.shape[0], 1, 1, 1):
                raise ChecksumError(f"{folder / y_name}: y is {y.shape}, expected [{x.shape[0]}, 1, 1, 1]")
            labels = np.asarray(y[:, 0, 0, 0])
    except (OSError, KeyError) as exc:
        raise ChecksumError(f"cannot read PCam {split} files in {folder} ({exc}); they are corrupt or not PCam") \
            from exc
    rows, labels = _select(labels, None, fraction)
    info = {"fraction": fraction, "fraction_seed": FRACTION_SEED,
            "files": [str(folder / x_name), str(folder / y_name)],
            "file_sizes": [(folder / x_name).stat().st_size, (folder / y_name).stat().st_size]}
    return PCamDataset(folder / x_name, labels, rows, split=split, normalize=normalize, transform=transform,
                       info=info)


def write_fake_pcam(root: str | os.PathLike[str], n_per_split: int = 16, seed: int = 0) -> Path:
    """Write small h5 files in the exact PCam format (``x`` uint8 [N, 96, 96, 3], ``y`` uint8 [N, 1, 1, 1]).

    Pinkish noise; label-1 patches get a dark purple blob in the centre 32x32 region (where the PCam label is
    defined), so the classes are learnable. Labels alternate 0/1 in a seeded order. Returns ``<root>/pcam``.
    """
    import h5py

    rng = np.random.default_rng(seed)
    folder = Path(root) / "pcam"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:96, 0:96]
    for split, (x_name, y_name) in PCAM_FILES.items():
        labels = rng.permutation(np.arange(n_per_split) % 2).astype(np.uint8)
        base = np.array([220.0, 170.0, 210.0])
        images = base + rng.normal(0, 12, size=(n_per_split, 96, 96, 3))
        for i in np.flatnonzero(labels):
            cy, cx = rng.uniform(36, 60, size=2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 8.0 ** 2))[..., None]
            images[i] -= blob * np.array([120.0, 130.0, 60.0])
        with atomic_write(folder / x_name) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("x", data=np.clip(np.rint(images), 0, 255).astype(np.uint8))
        with atomic_write(folder / y_name) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("y", data=labels.reshape(-1, 1, 1, 1))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Subsets


def evenly_spaced(n_total: int, n: int | None) -> Tensor:
    """``n`` indices spread evenly over ``range(n_total)`` (all of them when ``n`` is None or too large)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.arange(n) * n_total // n


def random_subset(n_total: int, n: int | None, seed: int) -> Tensor:
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
