"""The post's datasets with explicit train / validation / test splits: MNIST, rotated MNIST and PatchCamelyon.

Every loader returns a torch ``Dataset`` of ``(image float32 [C, H, W], label int64)``; model selection only ever
uses ``"validation"``, ``"test"`` gives the final number. Files are found through ``gevit_lib.files.data_dir`` and
only read there; parsed or regenerated arrays go to a separate cache folder (``resolve_cache_dir``). Each dataset
records where it came from (``.source``, ``.describe()``). The loader functions ``mnist``, ``rotated_mnist`` and
``pcam`` shadow their modules' names on the package. Synthetic stand-ins live in ``gevit_lib.testing``.
"""

from ._cache import array_checksum, clear_caches, resolve_cache_dir
from .dataset import SPLITS, ImageDataset, evenly_spaced, random_subset, take_subset
from .mnist import (MNIST_BACKGROUND, MNIST_FILES, MNIST_MEAN, MNIST_MIRRORS, MNIST_STD, MnistArrays,
                    UnverifiedDataWarning, load_mnist_arrays, mnist, mnist_validation_rows, read_idx)
from .pcam import PCAM_FILES, PCAM_MEAN, PCAM_STD, PCamDataset, pcam
from .rotated_mnist import (MNIST_ROT_ARCHIVE, MNIST_ROT_MEMBERS, REGEN_VERSION, regenerate_rotated_mnist,
                            regenerated_rotated_mnist_arrays, regenerated_sizes, rotate_images, rotated_mnist)

__all__ = [
    "SPLITS", "ImageDataset", "PCamDataset", "MnistArrays", "UnverifiedDataWarning", "mnist", "rotated_mnist", "pcam",
    "MNIST_MEAN", "MNIST_STD", "MNIST_BACKGROUND", "MNIST_FILES", "MNIST_MIRRORS", "MNIST_ROT_ARCHIVE",
    "MNIST_ROT_MEMBERS", "REGEN_VERSION", "PCAM_MEAN", "PCAM_STD", "PCAM_FILES", "load_mnist_arrays",
    "mnist_validation_rows", "read_idx", "regenerated_rotated_mnist_arrays", "rotate_images",
    "regenerate_rotated_mnist", "regenerated_sizes", "array_checksum", "resolve_cache_dir", "clear_caches",
    "evenly_spaced", "random_subset", "take_subset",
]
