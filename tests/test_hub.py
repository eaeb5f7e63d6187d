"""Published weights without model code (gevit_lib.hub): local lookup with sha256, offline error, key-naming errors
on mismatch, and no import of the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gevit_lib import hub
from gevit_lib.files import ChecksumError, MissingFileError
from gevit_lib.hub import IncompatibleCheckpointError, load_into
from gevit_lib.models import PUBLISHED

REPO = Path(__file__).resolve().parents[1]


def test_hub_imports_no_model() -> None:
    code = ("import sys, gevit_lib.hub; "
            "bad = sorted(m for m in sys.modules if m.startswith(('gevit_lib.models', 'gevit_lib.nn'))); "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_published_urls_point_at_the_pinned_commit() -> None:
    assert len(PUBLISHED) == 7
    for entry in PUBLISHED.values():
        assert hub.ORIGINAL_COMMIT in entry.url and entry.url.endswith(".pt")
        assert len(entry.sha256) == 64 and entry.remote.checksum == entry.sha256


def test_offline_missing_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEVIT_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("GEVIT_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(MissingFileError, match="vit_mnist.pt.*b9f2f9e0"):
        hub.checkpoint_file(PUBLISHED["vit_mnist"], download=False)


def test_corrupt_checkpoint_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEVIT_CHECKPOINT_DIR", str(tmp_path))
    (tmp_path / "vit_mnist.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ChecksumError):
        hub.checkpoint_file(PUBLISHED["vit_mnist"], download=False)


def test_load_into_names_missing_unexpected_and_shapes() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "extra.weight": torch.zeros(1)}
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_into(model, state, source="toy")
    msg = str(info.value)
    assert "1.weight" in msg and "1.bias" in msg and "extra.weight" in msg and "0.bias: (4,) vs (3,)" in msg


def test_reference_checkpoints_verify(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEVIT_CHECKPOINT_DIR", str(shared_dir / "reference" / "checkpoints"))
    for entry in PUBLISHED.values():
        assert hub.checkpoint_file(entry, download=False).is_file()
    state = hub.load_original_state_dict(PUBLISHED["gevit_p4sa_patch5_rotmnist"], download=False)
    assert len(state) == 226 and not any(k.startswith("module.") for k in state)
