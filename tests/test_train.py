"""Tests for gevit_lib.train: learning, determinism, resume, run-folder files, NaN handling, schedules, freezing,
best-on-validation selection and the test set kept out of selection. Tiny synthetic problems, CPU only."""

from __future__ import annotations

import csv
import json
import math
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import gevit_lib
from gevit_lib.train import (
    NonFiniteLossError,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    lr_factor,
    resolve_precision,
)

DIM, CLASSES = 8, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The models here are tiny: a second intra-op thread only adds synchronisation (and spinning when the
    machine is busy), so run this module single-threaded and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Linearly separable points: label = argmax of a fixed random linear map."""
    w = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x, (x @ w).argmax(dim=1)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, CLASSES))


def make_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """8x8 images: class = which quadrant holds a bright blob (2 classes: top vs bottom half)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 0, :, :4] += 1.0
    return x, y


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.1), nn.Flatten(),
                         nn.Linear(4 * 64, 2))


def noise_augment(x: Tensor, g: torch.Generator) -> Tensor:
    return x + 0.05 * torch.randn(x.shape, generator=g, device=x.device)


def flip_augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random horizontal flip per batch (a flip keeps the top/bottom class)."""
    return torch.flip(x, dims=[-1]) if torch.rand((), generator=g) < 0.5 else x


def same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in history]


TRAIN, VAL, TEST = make_data(384, 1), make_data(128, 2), make_data(128, 3)


def test_fit_learns_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    model = make_mlp()
    before = evaluate(model, VAL)
    config = TrainConfig(epochs=8, batch_size=32, lr=1e-2, label="blobs")
    result = fit(model, TRAIN, VAL, config, test_data=TEST, progress=True)
    after = evaluate(model, VAL, batch_size=32)  # same batches as fit's validation: identical numbers
    assert after["accuracy"] > 0.85 and after["accuracy"] > before["accuracy"] + 0.2
    assert after == result.best_val  # the selected weights are the ones in the model
    assert len(result.history) == 8 and result.epochs_completed == 8 and not result.stopped_early
    assert result.test is not None and result.test["n"] == 128 and result.test["accuracy"] > 0.8
    assert result.device == "cpu" and result.precision == "fp32"
    out = capsys.readouterr().out
    assert "blobs epoch 8/8" in out and "s/epoch" in out and "ETA" in out and "test acc" in out


def test_evaluate_agrees_with_plain_forward() -> None:
    model = make_mlp()
    model.train()
    rng = torch.get_rng_state()
    metrics = evaluate(model, TEST, batch_size=17)
    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # evaluation leaves the global RNG alone
    model.eval()
    with torch.no_grad():
        expected = model(TEST[0])
    assert metrics["n"] == 128
    assert metrics["accuracy"] == (expected.argmax(1) == TEST[1]).float().mean().item()
    assert math.isclose(metrics["loss"], F.cross_entropy(expected, TEST[1]).item(), rel_tol=1e-5)


def test_same_seed_gives_identical_weights() -> None:
    train, val = make_images(96, 1), make_images(32, 2)
    config = TrainConfig(epochs=3, batch_size=16, optimizer="sgd", lr=0.05, nesterov=True, seed=7)
    runs = []
    for seed in (7, 7, 8):
        model = make_cnn()
        result = fit(model, train, val, TrainConfig(**{**config.to_dict(), "seed": seed}), augment=flip_augment,
                     progress=False)
        runs.append((model.state_dict(), without_seconds(result.history)))
    assert same_weights(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not same_weights(runs[0][0], runs[2][0])  # the seed matters (shuffling, dropout, augmentation)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("where", ["epoch_boundary", "mid_epoch"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path, where: str) -> None:
    config = TrainConfig(epochs=5, batch_size=48, optimizer="adamw", lr=5e-3, weight_decay=1e-2,
                         schedule="warmup_cosine", warmup_epochs=1.5, grad_clip=1.0, seed=3)
    steps = math.ceil(384 / 48)

    reference = make_mlp()
    ref = fit(reference, TRAIN, VAL, config, run_dir=tmp_path / "ref", augment=noise_augment, progress=False)

    model = make_mlp()
    on_epoch_end, augment = None, noise_augment
    if where == "epoch_boundary":
        def on_epoch_end(record: dict, _: nn.Module) -> None:
            if record["epoch"] == 2:
                raise Interrupt
    else:
        calls = 0

        def augment(x: Tensor, g: torch.Generator) -> Tensor:
            nonlocal calls
            calls += 1
            if calls == 2 * steps + 3:  # third step of epoch 3
                raise Interrupt
            return noise_augment(x, g)
    with pytest.raises(Interrupt):
        fit(model, TRAIN, VAL, config, run_dir=tmp_path / "run", augment=augment, progress=False,
            on_epoch_end=on_epoch_end)
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["state"]["epoch"] == 2

    resumed_model = make_mlp(seed=99)  # different init: everything must come from the checkpoint
    resumed = fit(resumed_model, TRAIN, VAL, config, run_dir=tmp_path / "run", resume=True,
                  augment=noise_augment, progress=False)
    assert same_weights(resumed_model.state_dict(), reference.state_dict())
    assert without_seconds(resumed.history) == without_seconds(ref.history)
    assert resumed.best_epoch == ref.best_epoch and resumed.best_val == ref.best_val
    last_ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    last_run = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert same_weights(last_ref["model"], last_run["model"])  # the final (not only the best) weights agree
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]


def test_run_dir_files_are_complete_and_atomic(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp" / "a"
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-2)
    model = make_mlp()
    result = fit(model, TRAIN, VAL, config, run_dir=run, test_data=TEST, progress=False)
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.csv", "metrics.json", "last.pt", "best.pt"}
    assert not list(tmp_path.rglob("*.tmp"))
    recorded = json.loads((run / "config.json").read_text())
    assert TrainConfig(**recorded["train"]) == config and recorded["model"] is None
    assert recorded["gevit_lib_version"] == gevit_lib.__version__
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds",
                             "train_seconds"]
    assert all(0 < r["train_seconds"] < r["seconds"] for r in result.history)  # training alone, then validation
    assert [float(r["val_acc"]) for r in rows] == [r["val_acc"] for r in result.history]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["best_epoch"] == result.best_epoch and summary["test"] == result.test
    assert summary["epochs_completed"] == 3 and summary["n_train"] == 384
    assert same_weights(torch.load(run / "best.pt", weights_only=True), model.state_dict())

    with pytest.raises(FileExistsError, match="resume=True"):
        fit(make_mlp(), TRAIN, VAL, config, run_dir=run, progress=False)
    calls = []
    again = make_mlp(seed=5)
    repeat = fit(again, TRAIN, VAL, config, run_dir=run, resume=True, test_data=TEST, progress=False,
                 on_epoch_end=lambda r, m: calls.append(r))
    assert calls == [] and repeat.history == result.history and repeat.test == result.test
    assert same_weights(again.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.02"):
        fit(make_mlp(), TRAIN, VAL, TrainConfig(epochs=3, batch_size=64, lr=2e-2), run_dir=run, resume=True,
            progress=False)


def test_nonfinite_loss_stops_the_run(tmp_path: Path) -> None:
    calls = 0

    def poison(x: Tensor, g: torch.Generator) -> Tensor:
        nonlocal calls
        calls += 1
        return x * float("nan") if calls == 6 else x  # epoch 2, step 2 with 4 steps per epoch

    model = make_mlp()
    config = TrainConfig(epochs=3, batch_size=96, lr=1e-2)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2 \(global step 6\)") as err:
        fit(model, TRAIN, VAL, config, run_dir=tmp_path, augment=poison, progress=False)
    assert (err.value.epoch, err.value.step, err.value.global_step) == (2, 2, 6)
    after_epoch_1 = torch.load(tmp_path / "last.pt", weights_only=True)
    assert after_epoch_1["state"]["epoch"] == 1
    # The weights in memory are those after the last finite step (epoch 2, step 1), not touched by the NaN.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_schedules_follow_the_expected_curves() -> None:
    def curve(config: TrainConfig, steps_per_epoch: int) -> list[float]:
        opt = build_optimizer([nn.Parameter(torch.zeros(1))], config)
        sched = build_scheduler(opt, config, steps_per_epoch)
        lrs = []
        for _ in range(config.epochs * steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    lr = 0.1
    cos = curve(TrainConfig(epochs=10, lr=lr, optimizer="sgd", schedule="warmup_cosine", warmup_epochs=2), 5)
    assert cos[:10] == pytest.approx([lr * (i + 1) / 10 for i in range(10)])
    assert cos[10] == pytest.approx(lr) and cos[30] == pytest.approx(lr / 2)
    assert all(a > b for a, b in zip(cos[10:], cos[11:]))
    assert 0 < cos[-1] < 1e-2 * lr

    config = TrainConfig(epochs=6, lr=lr, optimizer="sgd", schedule="multistep", milestones=(2, 4), gamma=0.1)
    multi = curve(config, 3)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    torch_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    expected = []
    for _ in range(6):  # the torch scheduler stepped per epoch is the reference
        expected += [opt.param_groups[0]["lr"]] * 3
        opt.step()
        torch_sched.step()
    assert multi == pytest.approx(expected) and multi[0] == lr and multi[-1] == pytest.approx(lr / 100)

    assert curve(TrainConfig(epochs=3, lr=lr), 4) == [lr] * 12

    # fit records the LR each epoch starts with
    config = TrainConfig(epochs=4, batch_size=128, lr=lr, optimizer="sgd", schedule="warmup_cosine", warmup_epochs=1)
    result = fit(make_mlp(), TRAIN, VAL, config, progress=False)
    assert [r["lr"] for r in result.history] == pytest.approx([lr * lr_factor(3 * e, config, 3) for e in range(4)])


@pytest.mark.parametrize("optimizer,extra", [("adam", {}), ("adamw", {"weight_decay": 0.01}),
                                             ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4})])
def test_optimizers_compute_what_the_per_parameter_loop_computes(optimizer: str, extra: dict) -> None:
    """build_optimizer's foreach optimizers (for speed) give bit-identical weights to torch's CPU default, the loop
    over parameters: so the choice changes no trained result. Also with skipped gradients, float64 and a schedule."""
    config = TrainConfig(epochs=2, optimizer=optimizer, lr=1e-2, schedule="warmup_cosine", warmup_epochs=1, **extra)
    torch_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    torch_options = {"lr": 1e-2, "weight_decay": config.weight_decay}
    if optimizer == "sgd":
        torch_options.update(momentum=config.momentum, nesterov=config.nesterov)

    def run(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> list[Tensor]:
        torch.manual_seed(0)
        dtypes = (torch.float32, torch.float64)
        params = [nn.Parameter(torch.randn(n, dtype=dtype)) for n in (3, 40, 700) for dtype in dtypes]
        opt = make(params)
        sched = build_scheduler(opt, config, steps_per_epoch=3)
        for step in range(6):
            for i, p in enumerate(params):
                p.grad = None if (step + i) % 5 == 0 else torch.randn(p.shape, dtype=p.dtype)
            opt.step()
            sched.step()
        return [p.detach() for p in params]

    ours = run(lambda params: build_optimizer(params, config))
    reference = run(lambda params: torch_class(params, foreach=False, **torch_options))
    assert build_optimizer([nn.Parameter(torch.zeros(1))], config).defaults["foreach"] is True
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_only_trainable_parameters_change() -> None:
    model = make_mlp()
    model[0].requires_grad_(False)
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    head = {k: v.clone() for k, v in model[3].state_dict().items()}
    config = TrainConfig(epochs=2, batch_size=64, optimizer="adamw", lr=1e-2, weight_decay=0.1)
    assert len(build_optimizer(model, config).param_groups[0]["params"]) == 2
    result = fit(model, TRAIN, VAL, config, progress=False)
    assert same_weights(model[0].state_dict(), frozen)  # weight decay did not touch the frozen layer either
    assert not same_weights(model[3].state_dict(), head)
    assert result.history
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        build_optimizer(model, config)


def expected_best(candidates: list[tuple[int, float, float]]) -> int:
    """Epoch with the highest accuracy, ties broken by lower loss (first such epoch)."""
    return max(candidates, key=lambda c: (c[1], -c[2], -c[0]))[0]


@pytest.mark.parametrize("select_initial", [False, True])
def test_best_on_validation_is_restored(tmp_path: Path, select_initial: bool) -> None:
    # Validation labels shifted by one class: the better the model learns the task, the worse it scores on them,
    # so the last epoch is not the best one.
    val = (VAL[0], (VAL[1] + 1) % CLASSES)
    snapshots = {}
    model = make_mlp()
    snapshots[0] = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(epochs=5, batch_size=32, lr=1e-2, select_initial=select_initial)
    result = fit(model, TRAIN, val, config, run_dir=tmp_path, progress=False,
                 on_epoch_end=lambda r, m: snapshots.update({r["epoch"]: {k: v.clone() for k, v in
                                                                          m.state_dict().items()}}))
    candidates = [(r["epoch"], r["val_acc"], r["val_loss"]) for r in result.history]
    if select_initial:
        assert result.initial_val is not None
        candidates.insert(0, (0, result.initial_val["accuracy"], result.initial_val["loss"]))
    best = expected_best(candidates)
    assert result.best_epoch == best and best < 5
    assert same_weights(model.state_dict(), snapshots[best])
    assert not same_weights(model.state_dict(), snapshots[5])
    assert same_weights(torch.load(tmp_path / "best.pt", weights_only=True), snapshots[best])
    assert evaluate(model, val, batch_size=32) == result.best_val


def test_equal_accuracy_is_decided_by_lower_loss() -> None:
    val = (VAL[0][:8], VAL[1][:8])  # 8 points: accuracies tie once the model is right on all of them
    model = make_mlp()
    result = fit(model, TRAIN, val, TrainConfig(epochs=8, batch_size=32, lr=1e-2), progress=False)
    accs = [r["val_acc"] for r in result.history]
    first_at_max = accs.index(max(accs)) + 1
    best = expected_best([(r["epoch"], r["val_acc"], r["val_loss"]) for r in result.history])
    assert accs.count(max(accs)) > 1 and best != first_at_max  # the case really has a tie decided by the loss
    assert result.best_epoch == best


class CountingDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y, self.reads = x, y, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        self.reads += 1
        return self.x[i], self.y[i]


def test_test_data_is_not_used_for_selection() -> None:
    config = TrainConfig(epochs=4, batch_size=32, lr=1e-2)
    plain = make_mlp()
    without = fit(plain, TRAIN, VAL, config, progress=False)
    # Labels that would pull selection elsewhere if the test set were used for it.
    test = CountingDataset(TEST[0], (TEST[1] + 1) % CLASSES)
    model = make_mlp()
    result = fit(model, TRAIN, VAL, config, test_data=test, progress=False)
    assert test.reads == len(test)  # evaluated exactly once
    assert result.best_epoch == without.best_epoch
    assert same_weights(model.state_dict(), plain.state_dict())
    assert result.test == evaluate(model, test, batch_size=32)


def test_early_stopping_and_config_errors() -> None:
    val = (VAL[0], (VAL[1] + 1) % CLASSES)  # validation gets worse as training proceeds
    result = fit(make_mlp(), TRAIN, val, TrainConfig(epochs=20, batch_size=32, lr=1e-2, early_stopping_patience=2),
                 progress=False)
    assert result.stopped_early and result.epochs_completed == result.best_epoch + 2 < 20

    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        TrainConfig(epochs=1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown schedule"):
        TrainConfig(epochs=1, schedule="cosine")
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(epochs=1, optimizer="adam", nesterov=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("bf16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="2 inputs but 3 labels"):
        fit(make_mlp(), (torch.zeros(2, DIM), torch.zeros(3, dtype=torch.long)), None, TrainConfig(epochs=1),
            progress=False)


def test_resume_refuses_another_model_and_never_rewrites_a_finished_run(tmp_path: Path) -> None:
    config = TrainConfig(epochs=2, batch_size=64, lr=1e-2)
    model_config = {"builder": "build_gevit", "kwargs": {"preset": "rotmnist", "patch_size": 5, "digits": (3, 8)}}
    fit(make_mlp(), TRAIN, VAL, config, run_dir=tmp_path, progress=False, model_config=model_config)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["model"] == {"builder": "build_gevit", "kwargs": {"preset": "rotmnist", "patch_size": 5,
                                                                       "digits": [3, 8]}}
    assert torch.load(tmp_path / "last.pt", weights_only=True)["model_config"] == recorded["model"]
    files = {name: (tmp_path / name).read_bytes() for name in ("config.json", "metrics.json", "metrics.csv",
                                                                "last.pt", "best.pt")}

    # the same weight shapes, another function: refused, every difference named
    other = {"builder": "build_gevit", "kwargs": {"preset": "rotmnist", "patch_size": 3, "digits": (3, 8),
                                                  "positional": "gsa"}}
    with pytest.raises(ValueError, match=r"model_config\.kwargs\.patch_size: 5 -> 3") as err:
        fit(make_mlp(), TRAIN, VAL, config, run_dir=tmp_path, resume=True, progress=False, model_config=other)
    assert "model_config.kwargs.positional: '(absent)' -> 'gsa'" in str(err.value)
    with pytest.raises(ValueError, match="model_config: .* -> not recorded"):
        fit(make_mlp(), TRAIN, VAL, config, run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="already run 2 epochs"):  # a finished run is never shortened
        fit(make_mlp(), TRAIN, VAL, TrainConfig(epochs=1, batch_size=64, lr=1e-2), run_dir=tmp_path, resume=True,
            progress=False, model_config=model_config)
    # resuming the finished run with a new label (a resumable field) reuses it and writes nothing
    again = fit(make_mlp(seed=3), TRAIN, VAL, TrainConfig(epochs=2, batch_size=64, lr=1e-2, label="renamed"),
                run_dir=tmp_path, resume=True, test_data=TEST, progress=False, model_config=model_config)
    assert again.epochs_completed == 2 and again.test is not None
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    with pytest.raises(TypeError, match="JSON-serialisable"):
        fit(make_mlp(), TRAIN, VAL, config, progress=False, model_config={"group": object()})


def _write_unloadable(path: Path, kind: str) -> None:
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "state_dict":  # a loadable file of another kind
        torch.save(make_mlp().state_dict(), path)
    else:  # arbitrary pickled objects: refused by the safe loader
        torch.save({"format": "gevit-train/1", "payload": Interrupt()}, path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "state_dict", "unsafe_object"])
def test_an_unreadable_checkpoint_gives_one_clear_error(tmp_path: Path, kind: str) -> None:
    from gevit_lib.checkpointing import CheckpointError

    config = TrainConfig(epochs=2, batch_size=64, lr=1e-2)
    fit(make_mlp(), TRAIN, VAL, config, run_dir=tmp_path, progress=False)
    _write_unloadable(tmp_path / "last.pt", kind)
    with pytest.raises(CheckpointError) as err:
        fit(make_mlp(), TRAIN, VAL, TrainConfig(epochs=3, batch_size=64, lr=1e-2), run_dir=tmp_path, resume=True,
            progress=False)
    message = str(err.value)
    assert str(tmp_path / "last.pt") in message and "best.pt" in message and "new run folder" in message
    shown = "".join(traceback.format_exception(err.value))  # what the user sees, chained exceptions included
    assert "weights_only" not in shown and "Traceback" not in shown.split("CheckpointError")[0].replace(
        "Traceback (most recent call last):", "", 1)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("select_initial", [False, True])
def test_nonfinite_validation_loss_stops_the_run(tmp_path: Path, select_initial: bool) -> None:
    model = make_mlp()
    x = VAL[0].clone()
    x[5, 2] = float("nan")  # one corrupt validation value
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-2, select_initial=select_initial)
    with pytest.raises(NonFiniteLossError, match="validation loss is nan") as err:
        fit(model, TRAIN, (x, VAL[1]), config, run_dir=tmp_path, progress=False)
    assert err.value.split == "validation" and err.value.step is None
    assert err.value.epoch == (0 if select_initial else 1)
    assert not (tmp_path / "last.pt").exists()  # the epoch with the bad validation was not recorded
