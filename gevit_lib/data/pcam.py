"""PatchCamelyon: torchvision's h5 files, read lazily per item; layout and shapes checked (not hashed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from gevit_lib.files import ChecksumError, MissingFileError, data_dir, retry, socket_timeout

from .dataset import FRACTION_SEED, NormalizedImages, Transform, array_checksum, check_args, select, writable

PCAM_MEAN, PCAM_STD = (0.701, 0.538, 0.692), (0.235, 0.277, 0.213)
PCAM_FILES = {
    "train": ("camelyonpatch_level_2_split_train_x.h5", "camelyonpatch_level_2_split_train_y.h5"),
    "validation": ("camelyonpatch_level_2_split_valid_x.h5", "camelyonpatch_level_2_split_valid_y.h5"),
    "test": ("camelyonpatch_level_2_split_test_x.h5", "camelyonpatch_level_2_split_test_y.h5"),
}


class PCamDataset(NormalizedImages):
    """PatchCamelyon split read lazily from torchvision's h5 files (each worker opens its own handle)."""

    def __init__(self, images_file: Path, labels: np.ndarray, indices: np.ndarray, **kwargs: Any) -> None:
        super().__init__(labels, indices, name="pcam", source="torchvision-h5", num_classes=2, mean=PCAM_MEAN,
                         std=PCAM_STD, **kwargs)
        self.images_file = images_file
        self._handle: Any = None
        self._pid: int | None = None

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        import h5py

        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = h5py.File(self.images_file, "r"), os.getpid()
        return self._item(self._handle["x"][int(self.indices[index])], self.labels[index])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": None}

    def _checksum(self) -> str:
        return array_checksum(self.indices, self.labels)  # of the selection; the h5 images are not hashed


def _pcam_missing_error(folder: Path, missing: list[str], reason: str) -> MissingFileError:
    names = "\n".join(f"  {name}" for pair in PCAM_FILES.values() for name in pair)
    return MissingFileError(f"PCam files missing in {folder}: {', '.join(missing)}{reason}.\nThe six files "
                            f"(torchvision.datasets.PCAM layout):\n{names}\nGet them from "
                            f"torchvision.datasets.PCAM(root, split, download=True) (needs gdown), or the .h5.gz "
                            f"files of https://zenodo.org/record/2546921 (github.com/basveeling/pcam), gunzipped, "
                            f"and put them in {folder} (or point GEVIT_DATA_DIR at a folder holding pcam/).")


def pcam(split: str, root: str | os.PathLike[str] | None = None, fraction: float = 1.0, normalize: bool = True,
         download: bool = False, *, transform: Transform | None = None) -> PCamDataset:
    """PatchCamelyon from torchvision's h5 files ``<root>/pcam/camelyonpatch_level_2_split_{split}_{x,y}.h5``.

    Full splits (262,144 / 32,768 / 32,768); ``fraction`` < 1 keeps a seeded subset of any split, as for rotated
    MNIST (the original used an unseeded ``random.sample``). Images (x: uint8 [N, 96, 96, 3]) are read per item,
    labels (y: uint8 [N, 1, 1, 1]) at once; normalised with ``PCAM_MEAN`` / ``PCAM_STD`` when ``normalize``. With
    ``download`` torchvision fetches the split (needs ``gdown``; under a socket timeout, with bounded retries).
    """
    import h5py

    check_args(split, fraction)
    folder = data_dir(root) / "pcam"
    x_name, y_name = PCAM_FILES[split]
    missing = [n for n in (x_name, y_name) if not (folder / n).is_file()]
    if missing and download:
        if not writable(folder):
            raise _pcam_missing_error(folder, missing, " (data dir is read-only, not downloading)")
        try:  # gdown, which torchvision's PCAM uses, takes no timeout
            from torchvision.datasets import PCAM

            with socket_timeout():
                retry(lambda: PCAM(str(folder.parent), split={"validation": "val"}.get(split, split), download=True))
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
    rows, labels = select(labels, None, fraction)
    info = {"fraction": fraction, "fraction_seed": FRACTION_SEED,
            "files": [str(folder / x_name), str(folder / y_name)],
            "file_sizes": [(folder / x_name).stat().st_size, (folder / y_name).stat().st_size]}
    return PCamDataset(folder / x_name, labels, rows, split=split, normalize=normalize, transform=transform,
                       info=info)
