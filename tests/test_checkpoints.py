"""Published checkpoint registry: local lookup with sha256, offline error, key-naming errors on mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gevit_lib import checkpoints
from gevit_lib.checkpoints import PUBLISHED, IncompatibleCheckpointError, load_into
from gevit_lib.files import ChecksumError, MissingFileError


def test_registry_urls_point_at_the_pinned_commit() -> None:
    for entry in PUBLISHED.values():
        assert checkpoints.ORIGINAL_COMMIT in entry.url and entry.url.endswith(".pt")
        assert len(entry.sha256) == 64


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown published checkpoint 'nope'.*vit_rotmnist"):
        checkpoints.checkpoint_file("nope")


def test_offline_missing_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEVIT_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("GEVIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GEVIT_SHARED_DIR", str(tmp_path / "noshared"))
    with pytest.raises(MissingFileError, match="vit_mnist.pt.*b9f2f9e0"):
        checkpoints.checkpoint_file("vit_mnist", download=False)


def test_corrupt_checkpoint_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEVIT_CHECKPOINT_DIR", str(tmp_path))
    (tmp_path / "vit_mnist.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ChecksumError):
        checkpoints.checkpoint_file("vit_mnist", download=False)


def test_load_into_names_missing_unexpected_and_shapes() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "extra.weight": torch.zeros(1)}
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_into(model, state, source="toy")
    msg = str(info.value)
    assert "1.weight" in msg and "1.bias" in msg and "extra.weight" in msg and "0.bias: (4,) vs (3,)" in msg


def test_shared_checkpoints_verify(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEVIT_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("GEVIT_SHARED_DIR", str(shared_dir))
    for name in PUBLISHED:
        assert checkpoints.checkpoint_file(name, download=False).is_file()
    state = checkpoints.load_original_state_dict("gevit_p4sa_patch5_rotmnist", download=False)
    assert len(state) == 226 and not any(k.startswith("module.") for k in state)
