"""Where data and checkpoints live, checksums, verified downloads and atomic writes: every file the library reads
from outside the repository goes through here. Downloads never hang: every connect and read has a timeout
(``TIMEOUT_S``) and a download is tried at most ``TRIES`` times (waiting ``BACKOFF_S``, doubling, in between).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["RemoteFile", "MissingFileError", "ChecksumError", "data_dir", "verify", "fetch", "retry", "socket_timeout",
           "atomic_write", "atomic_torch_save", "file_digest"]

TIMEOUT_S = 30.0  # seconds per connect / read: a server that stops answering fails within this
TRIES = 3  # attempts per download
BACKOFF_S = 1.0  # wait 1 s, then 2 s, ... between attempts

T = TypeVar("T")


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
    env = os.environ.get("GEVIT_DATA_DIR")
    return Path(root if root is not None else env or "data").expanduser()


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in chunks)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | os.PathLike[str], checksum: str, algo: str = "sha256") -> None:
    """Raise ChecksumError unless ``path`` has the expected digest."""
    digest = file_digest(path, algo)
    if digest != checksum.lower():
        raise ChecksumError(f"{path}: {algo} is {digest}, expected {checksum}. The file is corrupt or "
                            f"truncated; delete it and download it again.")


def fetch(remote: RemoteFile, directory: str | os.PathLike[str], *, search: list[Path] | None = None,
          download: bool = True, timeout: float | None = None, tries: int | None = None) -> Path:
    """A verified local copy of ``remote``: found in ``directory`` or a ``search`` folder, else downloaded into
    ``directory`` (when ``download``; ``timeout`` per connect / read, up to ``tries`` attempts).

    Raises MissingFileError when absent and the download is disabled or fails, ChecksumError when a found copy
    is corrupt or every downloaded one is (a corrupt download is never left in ``directory``).
    """
    directory = Path(directory)
    candidates = [directory / remote.filename] + [Path(s) / remote.filename for s in (search or [])]
    for path in candidates:
        if path.is_file():
            verify(path, remote.checksum, remote.algo)
            return path
    target = directory / remote.filename
    reason = " (download disabled)"
    if download:
        attempts, wait = tries or TRIES, timeout or TIMEOUT_S
        try:
            retry(lambda: _download(remote, target, wait), tries=attempts)
            return target
        except (OSError, http.client.HTTPException) as exc:  # URLError and socket timeouts are OSErrors
            reason = f" (download failed: {exc}; tried up to {attempts} times, {wait:g} s timeout each)"
    looked = ", ".join(str(p) for p in candidates)
    raise MissingFileError(f"Missing file {remote.filename} ({remote.algo} {remote.checksum}){reason}.\n"
                           f"Looked in: {looked}.\nDownload it from {remote.url} and put it in {directory} "
                           f"(or point GEVIT_DATA_DIR / GEVIT_CHECKPOINT_DIR at a folder holding it).")


def retry(action: Callable[[], T], *, tries: int | None = None) -> T:
    """``action()``, tried again on network errors (OSError, HTTP errors other than 4xx, ChecksumError of a
    download) up to ``tries`` times in all (default ``TRIES``), waiting ``BACKOFF_S * 2**k`` s in between."""
    for k in range((tries or TRIES) - 1):
        try:
            return action()
        except (OSError, http.client.HTTPException, ChecksumError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500:  # missing, forbidden: permanent
                raise
            time.sleep(BACKOFF_S * 2**k)
    return action()


@contextmanager
def socket_timeout(seconds: float | None = None) -> Iterator[None]:
    """Give sockets opened inside (by third-party downloaders that take no timeout) a default ``seconds`` timeout
    (``TIMEOUT_S`` by default). Process-wide while it lasts: use it around a blocking download only."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds or TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _download(remote: RemoteFile, target: Path, timeout: float) -> None:
    """One attempt: stream ``remote.url`` into ``target``, checking the checksum before the file appears."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.new(remote.algo)
    with urllib.request.urlopen(remote.url, timeout=timeout) as response, atomic_write(target) as tmp:
        with open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != remote.checksum.lower():
            raise ChecksumError(f"{remote.url}: the downloaded file's {remote.algo} is {digest.hexdigest()}, "
                                f"expected {remote.checksum} (transfer corrupted, or the server's file changed)")


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
