"""What the notebooks load: published models and rotated-MNIST splits, with the smoke-profile fallback.

In ``quick`` and ``full`` a missing checkpoint or dataset is an error that says what to download. In ``smoke``
(tests, possibly without the reference material) a missing checkpoint becomes an untrained model of the same
architecture and missing MNIST becomes a small synthetic MNIST; both are labelled as such in every figure's and
table's provenance, so a smoke output can never pass for a real result.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .files import ChecksumError, MissingFileError
from .models import create_model, load_published
from .profiles import check_profile

__all__ = ["published_model", "rotated_digits", "upright_digits", "smoke_mnist_root", "digits_root"]


def published_model(name: str, profile: str, **options: Any) -> tuple[nn.Module, str]:
    """``(model in eval mode, provenance label)``; in ``smoke`` an untrained stand-in when the file is unavailable."""
    check_profile(profile)
    try:
        return load_published(name, download=profile != "smoke", **options), name
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


def _with_fallback(loader: Any, split: str, profile: str, data_dir: str | os.PathLike[str] | None,
                   **kwargs: Any) -> tuple[Dataset, str]:
    check_profile(profile)
    try:  # smoke never reaches for the network: it falls back instead
        ds = loader(split, root=data_dir, download=profile != "smoke", **kwargs)
    except MissingFileError:
        if profile != "smoke":
            raise
        from .data import UnverifiedDataWarning

        with warnings.catch_warnings():  # the stand-in is small by design and labelled as synthetic below
            warnings.simplefilter("ignore", UnverifiedDataWarning)
            ds = loader(split, root=smoke_mnist_root(), download=False, **kwargs)
        return ds, f"synthetic MNIST stand-in ({getattr(ds, 'source', '?')}; real MNIST unavailable)"
    return ds, str(getattr(ds, "source", "unknown"))


def rotated_digits(split: str, profile: str, data_dir: str | os.PathLike[str] | None = None,
                   **kwargs: Any) -> tuple[Dataset, str]:
    """``(rotated MNIST split, data-source label)``: official archive, else regenerated; smoke falls back."""
    from .data import rotated_mnist

    ds, label = _with_fallback(rotated_mnist, split, profile, data_dir, **kwargs)
    return ds, (f"rotated MNIST ({label})" if "stand-in" not in label else label)


def upright_digits(split: str, profile: str, data_dir: str | os.PathLike[str] | None = None,
                   **kwargs: Any) -> tuple[Dataset, str]:
    """``(MNIST split, data-source label)``; smoke falls back to synthetic digits."""
    from .data import mnist

    ds, label = _with_fallback(mnist, split, profile, data_dir, **kwargs)
    return ds, (f"MNIST ({label})" if "stand-in" not in label else label)


def digits_root(profile: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[str | None, str]:
    """``(root to pass to the MNIST loaders, data-source label)``: ``data_dir`` itself, or in ``smoke`` the
    synthetic stand-in's folder when real MNIST is unavailable."""
    ds, label = rotated_digits("test", profile, data_dir)
    return (str(smoke_mnist_root()) if "stand-in" in label else (str(data_dir) if data_dir else None)), label
