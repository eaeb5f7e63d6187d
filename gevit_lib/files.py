"""Where data and checkpoints live, checksums, downloads with verification, and atomic writes.

Every file the library reads from outside the repository goes through here: a data directory resolved from the
argument, then ``GEVIT_DATA_DIR``, then ``./data``; checksums verified before use; offline failures raise one
clear error naming the files, their checksums and where to put them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RemoteFile",
    "MissingFileError",
    "ChecksumError",
    "data_dir",
    "file_digest",
    "verify",
    "fetch",
    "atomic_write",
    "atomic_torch_save",
]


class MissingFileError(FileNotFoundError):
    """A required file is absent and could not be downloaded."""


class ChecksumError(ValueError):
    """A file is present but its checksum does not match (corrupt or truncated)."""


@dataclass(frozen=True)
class RemoteFile:
    """A file known by name, public URL and checksum (``algo`` is "sha256" or "md5")."""

    filename: str
    url: str
    checksum: str
    algo: str = "sha256"


def data_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``root`` if given, else ``$GEVIT_DATA_DIR``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("GEVIT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("data")


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | os.PathLike[str], checksum: str, algo: str = "sha256") -> None:
    """Raise ChecksumError unless ``path`` has the expected digest."""
    got = file_digest(path, algo)
    if got != checksum.lower():
        raise ChecksumError(
            f"{path}: {algo} is {got}, expected {checksum}. The file is corrupt or truncated; "
            f"delete it and download it again."
        )


def fetch(remote: RemoteFile, directory: str | os.PathLike[str], *, search: list[Path] | None = None,
          download: bool = True) -> Path:
    """Return a verified local copy of ``remote``.

    Looks in ``directory`` and then in every folder of ``search``; downloads into ``directory`` when absent
    (and ``download``); always verifies the checksum. Raises MissingFileError when absent and offline,
    ChecksumError when a found or downloaded copy is corrupt.
    """
    directory = Path(directory)
    candidates = [directory / remote.filename] + [Path(s) / remote.filename for s in (search or [])]
    for path in candidates:
        if path.is_file():
            verify(path, remote.checksum, remote.algo)
            return path
    target = directory / remote.filename
    error: Exception | None = None
    if download:
        try:
            _download(remote.url, target)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            error = exc
        else:
            verify(target, remote.checksum, remote.algo)
            return target
    looked = ", ".join(str(p) for p in candidates)
    reason = f" (download failed: {error})" if error else " (download disabled)"
    raise MissingFileError(
        f"Missing file {remote.filename} ({remote.algo} {remote.checksum}){reason}.\n"
        f"Looked in: {looked}.\nDownload it from {remote.url} and put it in {directory} "
        f"(or point GEVIT_DATA_DIR / GEVIT_CHECKPOINT_DIR at a folder holding it)."
    )


def _download(url: str, target: Path, timeout: float = 60.0) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_write(target) as tmp:
        with open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through a temporary file and a rename, so an interruption never leaves a torn file."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
