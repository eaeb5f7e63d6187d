"""The batch entry point: lists its experiments and runs a GE-ViT training end to end (smoke, synthetic MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gevit_lib import run
from gevit_lib.data import make_synthetic_mnist


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("gevit_rotmnist", "gevit_pcam", "vit_rotmnist", "posthoc_pcam"):
        assert name in out


def test_gevit_training_smoke_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEVIT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_synthetic_mnist(tmp_path / "data", n_train=120, n_test=20, seed=0).parent
    args = ["--experiment", "gevit_rotmnist", "--profile", "smoke", "--device", "cpu", "--patch-size", "3",
            "--data-dir", str(root), "--run-dir", str(tmp_path / "run"), "--num-workers", "0"]
    assert run.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["best_val"]["n"] > 0 and (tmp_path / "run" / "last.pt").is_file()
    assert run.main(args + ["--resume"]) == 0  # a finished run resumes to the same result
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["best_val"] == first["best_val"]
