"""Data-dir resolution, checksum verification, offline errors and atomic writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from gevit_lib import files
from gevit_lib.files import ChecksumError, MissingFileError, RemoteFile


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GEVIT_DATA_DIR", raising=False)
    assert files.data_dir() == Path("data")
    monkeypatch.setenv("GEVIT_DATA_DIR", str(tmp_path))
    assert files.data_dir() == tmp_path
    assert files.data_dir(tmp_path / "x") == tmp_path / "x"


def _remote(content: bytes, name: str = "thing.bin") -> RemoteFile:
    # an unreachable URL: the test must not depend on the network
    return RemoteFile(name, "http://127.0.0.1:9/thing.bin", hashlib.sha256(content).hexdigest())


def test_fetch_finds_and_verifies(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "thing.bin").write_bytes(b"hello")
    assert files.fetch(_remote(b"hello"), tmp_path / "main", search=[other]) == other / "thing.bin"


def test_missing_file_offline_names_file_checksum_and_place(tmp_path: Path) -> None:
    remote = _remote(b"hello")
    with pytest.raises(MissingFileError) as info:
        files.fetch(remote, tmp_path)
    msg = str(info.value)
    assert "thing.bin" in msg and remote.checksum in msg and str(tmp_path) in msg and remote.url in msg
    assert not list(tmp_path.glob("*.tmp")), "a failed download must leave no partial file"


def test_bad_checksum_is_detected(tmp_path: Path) -> None:
    (tmp_path / "thing.bin").write_bytes(b"hellp")
    with pytest.raises(ChecksumError, match="corrupt or truncated"):
        files.fetch(_remote(b"hello"), tmp_path)


def test_atomic_torch_save_leaves_no_temp_and_survives_failure(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    files.atomic_torch_save({"a": torch.ones(2)}, path)
    assert torch.load(path)["a"].sum() == 2
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert torch.load(path)["a"].sum() == 2  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
