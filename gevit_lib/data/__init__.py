"""The post's datasets with explicit train / validation / test splits: MNIST, rotated MNIST and PatchCamelyon.

Every loader returns a torch ``Dataset`` of ``(image float32 [C, H, W], label int64)`` that records where it came
from (``.source``, ``.describe()``); model selection only ever uses ``"validation"``. Files are only read in the
data dir (``gevit_lib.files.data_dir``); parsed or regenerated arrays go to a cache folder (``resolve_cache_dir``).
The loader functions ``mnist``, ``rotated_mnist`` and ``pcam`` shadow their modules' names on the package.
"""

from .dataset import (SPLITS, ImageDataset, array_checksum, clear_caches, evenly_spaced, random_subset,
                      resolve_cache_dir, take_subset)
from .mnist import (MNIST_BACKGROUND, MNIST_FILES, MNIST_MEAN, MNIST_MIRRORS, MNIST_STD, MnistArrays,
                    UnverifiedDataWarning, load_mnist_arrays, mnist, mnist_validation_rows)
from .pcam import PCAM_FILES, PCAM_MEAN, PCAM_STD, PCamDataset, pcam
from .rotated_mnist import (MNIST_ROT_ARCHIVE, MNIST_ROT_MEMBERS, REGEN_VERSION, regenerate_rotated_mnist,
                            regenerated_rotated_mnist_arrays, rotate_images, rotated_mnist)
