"""The batch entry point: lists its experiments and runs a GE-ViT training end to end (smoke, synthetic MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gevit_lib import run
from gevit_lib.testing import make_synthetic_mnist


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


def test_overrides_parse_json_values() -> None:
    assert run._overrides(["epochs=12", "lr=3e-3", "n_train=null", "patch_group=p4m"]) == {
        "epochs": 12, "lr": 3e-3, "n_train": None, "patch_group": "p4m"}
    assert run._overrides(None) is None
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        run._overrides(["epochs"])


def test_model_zoo_subset_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEVIT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_synthetic_mnist(tmp_path / "data", n_train=200, n_test=40, seed=0).parent
    args = ["--experiment", "model_zoo_rotmnist", "--profile", "smoke", "--device", "cpu", "--data-dir", str(root),
            "--run-dir", str(tmp_path / "zoo"), "--models", "patch_p4_p14_mean", "--set", "n_train=32", "n_val=8",
            "n_test=8"]
    assert run.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    assert [r["key"] for r in rows] == ["patch_p4_p14_mean"]
    meta = json.loads((tmp_path / "zoo" / "meta.json").read_text())
    assert meta["n_train"] == 32 and meta["profile_sizes"]["n_test"] == 8
