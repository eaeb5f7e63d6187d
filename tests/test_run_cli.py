"""The training command line (gevit_lib.run) as a user meets it: listing, unknown names, option
checks, GE-ViT and ViT training on synthetic MNIST (smoke), and a run killed or finished, then resumed with a
changed model, fewer epochs, or a truncated checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gevit_lib import run
from gevit_lib.testing import make_synthetic_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_mnist(tmp_path_factory.mktemp("data"), n_train=120, n_test=20, seed=0).parent


@pytest.fixture()
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "cache"  # regenerated rotated MNIST, shared by the tests
    monkeypatch.setenv("GEVIT_CACHE_DIR", str(folder))
    return folder


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_list_names_the_training_experiments_and_the_notebooks(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("gevit_rotmnist", "gevit_rotmnist_10pct", "gevit_rotmnist_3v8", "gevit_pcam", "vit_rotmnist",
                 "vit_mnist", "vit_rotmnist_10pct"):
        assert f"  {name} " in out
    assert "notebooks 06-10" in out and "python -m gevit_lib.reproduce --only 06 --profile full" in out


def test_unknown_experiments_say_where_to_go(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run.main(["--experiment", "posthoc_low_data"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "unknown experiment 'posthoc_low_data'; choose one of gevit_rotmnist" in err and "notebooks 06-10" in err


def test_the_cli_does_not_import_notebook_code() -> None:
    check = ("import sys, gevit_lib.run; "
             "print(sorted(m for m in sys.modules if m.startswith(('gevit_lib.experiments', 'gevit_lib.posthoc'))))")
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("extra, message", [
    (["--set", "epochs=abc"], "epochs must be an integer >= 1, got 'abc'"),
    (["--set", "epochs=2.5"], "epochs must be an integer >= 1, got 2.5"),
    (["--set", "n_train=-5"], "n_train must be an integer >= 1 or null (the whole split), got -5"),
    (["--set", "lr=0"], "lr must be a number > 0, got 0"),
    (["--set", "batch_size=true"], "batch_size must be an integer >= 1, got True"),
    (["--set", "colour=red"], "'colour' cannot be set; settable fields: epochs"),
    (["--set", "epochs"], "--set expects FIELD=VALUE, got 'epochs'"),
    (["--set", "epochs=2", "epochs=3"], "--set gives epochs twice"),
    (["--patch-size", "0"], "patch_size must be an integer >= 1, got 0"),
    (["--group", "p5"], "unknown group 'p5'"),
    (["--experiment", "gevit_rotmnist_3v8", "--group", "p4"], "gevit_rotmnist_3v8 does not take ['group'] (its "
                                                               "model has group='p4m')"),
    (["--experiment", "vit_rotmnist", "--patch-size", "3"], "vit_rotmnist does not take ['patch_size']"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--models", "a"], "unrecognized arguments: --models a"),
])
def test_options_are_checked_before_any_work(capsys: pytest.CaptureFixture[str], extra: list[str],
                                             message: str) -> None:
    args = ["--experiment", "gevit_rotmnist", "--profile", "smoke", "--data-dir", "/nonexistent"]
    with pytest.raises(SystemExit) as exit_:
        run.main(args + extra)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_gevit_training_smoke_and_resume(tmp_path: Path, data_root: Path, cache: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--experiment", "gevit_rotmnist", "--profile", "smoke", "--device", "cpu", "--patch-size", "3",
            "--data-dir", str(data_root), "--run-dir", str(tmp_path / "run"), "--num-workers", "0"]
    assert run.main(args) == 0
    first = last_json(capsys.readouterr().out)
    assert first["experiment"] == "gevit_rotmnist" and first["profile"] == "smoke"
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["n_train"] == 16 and first["n_test"] == summary["n_test"] == 8  # the smoke sizes
    assert first["n_val"] == summary["n_val"] == 4  # 8 asked, but the fake MNIST's validation split has 4
    assert first["val_accuracy"] == summary["best_val"]["accuracy"] and first["test_loss"] == summary["test"]["loss"]
    assert first["val_loss"] > 0 and first["epochs_completed"] == 1
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["model"]["builder"] == "build_gevit"
    assert recorded["model"]["kwargs"] == {"preset": "rotmnist", "group": "p4", "patch_size": 3}
    assert recorded["model"]["data"]["n_train"] == 16 and recorded["train"]["batch_size"] == 8
    assert run.main(args + ["--resume"]) == 0  # a finished run resumes to the same result
    again = last_json(capsys.readouterr().out)
    assert again == first


def test_vit_training_smoke(tmp_path: Path, data_root: Path, cache: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--experiment", "vit_rotmnist_10pct", "--profile", "smoke", "--device", "cpu", "--data-dir",
            str(data_root), "--run-dir", str(tmp_path / "vit"), "--num-workers", "0", "--set", "n_train=null"]
    assert run.main(args) == 0
    result = last_json(capsys.readouterr().out)
    recorded = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert recorded["model"]["kwargs"] == {"preset": "mnist"} and recorded["model"]["data"]["fraction"] == 0.1
    summary = json.loads((tmp_path / "vit" / "metrics.json").read_text())
    assert 0 < summary["n_train"] < 120 // 2  # 10% of the regenerated training split, all of it
    assert result["n_val"] == summary["n_val"] and result["test_accuracy"] == summary["test"]["accuracy"]


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gevit_lib.run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_killed_or_finished_run_resumes_only_with_the_same_model(tmp_path: Path, data_root: Path,
                                                                  cache: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEVIT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "run"
    args = ["--experiment", "gevit_rotmnist", "--profile", "smoke", "--device", "cpu", "--data-dir",
            str(data_root), "--run-dir", str(folder), "--num-workers", "0", "--set", "epochs=3"]
    proc = subprocess.Popen([sys.executable, "-m", "gevit_lib.run", *args, "--patch-size", "3"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (folder / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # killed after its first checkpoint (or it had already finished)
    proc.wait(timeout=60)
    assert (folder / "last.pt").is_file()
    records = {name: (folder / name).read_bytes() for name in ("config.json", "metrics.json", "last.pt")}

    changed = cli(args + ["--patch-size", "5", "--resume"], env)
    assert changed.returncode == 1, changed.stderr
    assert "model_config.kwargs.patch_size: 3 -> 5" in changed.stderr and "Traceback" not in changed.stderr
    assert {name: (folder / name).read_bytes() for name in records} == records

    resumed = cli(args + ["--patch-size", "3", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert last_json(resumed.stdout)["epochs_completed"] == 3
    finished = {name: (folder / name).read_bytes() for name in ("config.json", "metrics.json", "metrics.csv")}

    shorter = cli(args[:-1] + ["epochs=2", "--patch-size", "3", "--resume"], env)
    assert shorter.returncode == 1 and "already run 3 epochs" in shorter.stderr
    assert {name: (folder / name).read_bytes() for name in finished} == finished

    last = folder / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. a copy cut short
    truncated = cli(args + ["--patch-size", "3", "--resume"], env)
    assert truncated.returncode == 1 and "Traceback" not in truncated.stderr
    assert f"cannot read the training checkpoint {last}" in truncated.stderr
    assert "best.pt" in truncated.stderr and "new run folder" in truncated.stderr
    assert "weights_only" not in truncated.stderr
