"""Shared file and cache helpers of the data loaders: per-process memo, array checksums, the npz cache folder."""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gevit_lib.files import atomic_write

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
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "gevit_companion"


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` atomically; an unwritable cache folder only warns (the arrays are rebuilt next time)."""
    if not writable(path.parent):
        warnings.warn(f"cache folder {path.parent} is not writable; not caching {path.name}", stacklevel=3)
        return
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as exc:
        warnings.warn(f"could not write cache {path}: {exc}", stacklevel=3)


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of ``path``, or None when it is absent or unreadable (with a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        warnings.warn(f"ignoring unreadable cache {path} ({exc}); rebuilding it", stacklevel=3)
        return None
