"""Tests for multi-process training (gevit_lib.distributed and the DDP path of gevit_lib.train).

One torchrun launch (2 CPU processes, gloo, 127.0.0.1, ~5 s) runs this file as its script and does in turn: a full
run, the resumption of a 1-process checkpoint, an interrupted and resumed run with dropout and augmentation, and a
run torn down after epoch 2 (then resumed here by one process). Results are compared with single-process runs made
here; equality is up to float rounding (the global batches are the same, but their gradients are summed in parts).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gevit_lib import distributed
from gevit_lib.distributed import ShardedBatchSampler, shard_bounds
from gevit_lib.train import TrainConfig, evaluate, fit, train_loader

REPO = Path(__file__).resolve().parents[1]
DIM, CLASSES = 8, 3
LAUNCH_TIMEOUT_S = 180
# 100 samples in global batches of 11: 9 full batches split 6 + 5 (loss weights 12/11 and 10/11) and a last batch of
# 1 sample, for which rank 1 runs a stand-in with weight 0. Evaluation batches of 8: 7 batches, the last one of 2.
CONFIG = TrainConfig(epochs=4, batch_size=11, eval_batch_size=8, optimizer="adamw", lr=1e-2, weight_decay=1e-2,
                     schedule="warmup_cosine", warmup_epochs=1, grad_clip=0.5, seed=5)
STEPS_PER_EPOCH = 10  # ceil(100 / 11)
CRASH_AFTER_EPOCH = 2
ATOL = 1e-6
needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    w = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x, (x @ w).argmax(dim=1)


def make_model(seed: int = 0) -> nn.Module:
    """No dropout: randomness inside a step is per rank and would not match a single process."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def make_dropout_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, CLASSES))


# The 6 test samples make one evaluation batch: rank 1 has no test batch at all.
TRAIN, VAL, TEST = make_data(100, 1), make_data(50, 2), make_data(6, 3)


class Interrupt(Exception):
    pass


def no_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in history]


# ---------------------------------------------------------------------------------------------------------------
# The torchrun worker (this file run as a script)


def worker(out: Path) -> None:
    rank = int(os.environ["RANK"])
    (out / f"pid_rank{rank}").write_text(str(os.getpid()))
    # a) a full run; then reusing its run_dir without resume=True is refused on every rank
    model = make_model()
    result = fit(model, TRAIN, VAL, CONFIG, run_dir=out / "full", test_data=TEST, progress=True)
    refused = ""
    try:
        fit(make_model(), TRAIN, VAL, CONFIG, run_dir=out / "full", progress=False)
    except FileExistsError as exc:
        refused = str(exc)
    torch.save({"refused": refused, "weights": model.state_dict(), "history": no_seconds(result.history),
                "best_epoch": result.best_epoch, "best_val": result.best_val, "test": result.test,
                "device": result.device, "local_val": evaluate(model, VAL, batch_size=8),
                "local_test": evaluate(model, TEST, batch_size=8)}, out / f"full_rank{rank}.pt")
    # b) resume a checkpoint written by one process
    model = make_model(seed=99)
    fit(model, TRAIN, VAL, CONFIG, run_dir=out / "from_one", resume=True, progress=False)
    torch.save(model.state_dict(), out / f"from_one_rank{rank}.pt")

    # c) dropout and augmentation (per-rank randomness): a 2-process run interrupted after epoch 2 and resumed
    # with 2 processes equals the uninterrupted one exactly
    drawn: list[float] = []

    def augment(x: Tensor, g: torch.Generator) -> Tensor:
        noise = 0.1 * torch.randn(x.shape, generator=g)
        drawn.append(noise[0, 0].item())
        return x + noise

    def stop(record: dict, _: nn.Module) -> None:
        if record["epoch"] == CRASH_AFTER_EPOCH:
            raise Interrupt

    uninterrupted = make_dropout_model()
    fit(uninterrupted, TRAIN, VAL, CONFIG, run_dir=out / "noisy", augment=augment, progress=False)
    try:
        fit(make_dropout_model(), TRAIN, VAL, CONFIG, run_dir=out / "noisy_resumed", augment=augment,
            progress=False, on_epoch_end=stop)
    except Interrupt:
        pass
    resumed = make_dropout_model(seed=99)
    fit(resumed, TRAIN, VAL, CONFIG, run_dir=out / "noisy_resumed", resume=True, augment=augment, progress=False)
    torch.save({"uninterrupted": uninterrupted.state_dict(), "resumed": resumed.state_dict(), "drawn": drawn},
               out / f"noisy_rank{rank}.pt")

    # d) right after epoch 2, rank 1 kills rank 0 and dies: the worst case of a job being torn down as soon as
    # any process stops. The checkpoint of epoch 2 must be complete anyway (ranks wait for rank 0's writes).
    def crash(record: dict, _: nn.Module) -> None:
        if record["epoch"] == CRASH_AFTER_EPOCH and rank == 1:
            os.kill(int((out / "pid_rank0").read_text()), signal.SIGKILL)
            os._exit(17)

    fit(make_model(), TRAIN, VAL, CONFIG, run_dir=out / "crash", progress=False, on_epoch_end=crash)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    if sys.platform.startswith("linux"):  # gloo on the loopback interface, whatever the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0",
           "--monitor-interval", "0.1", __file__, str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session started above
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: single-process references and the 2-process launch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(one_thread: None) -> dict:
    """The uninterrupted single-process run, with the weights after every epoch."""
    model = make_model()
    after: dict[int, dict[str, Tensor]] = {}
    result = fit(model, TRAIN, VAL, CONFIG, test_data=TEST, progress=False,
                 on_epoch_end=lambda r, m: after.update({r["epoch"]: {k: v.clone() for k, v in
                                                                      m.state_dict().items()}}))
    return {"weights": model.state_dict(), "result": result, "after": after}


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict:
    out = tmp_path_factory.mktemp("ddp")

    def stop(record: dict, _: nn.Module) -> None:
        if record["epoch"] == CRASH_AFTER_EPOCH:
            raise Interrupt

    with pytest.raises(Interrupt):  # the 1-process checkpoint that the 2 processes resume
        fit(make_model(), TRAIN, VAL, CONFIG, run_dir=out / "from_one", progress=False, on_epoch_end=stop)
    proc = launch(out)
    log = f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for name in ("full_rank0.pt", "full_rank1.pt", "from_one_rank0.pt", "from_one_rank1.pt", "noisy_rank0.pt",
                 "noisy_rank1.pt"):
        assert (out / name).exists(), f"the 2-process run did not write {name}\n{log}"
    assert proc.returncode != 0, f"rank 1 should have crashed in the last run\n{log}"
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr, "log": log}


def assert_close_weights(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], atol=ATOL, rtol=0, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Multi-process tests


@needs_gloo
def test_two_processes_equal_one_process_with_the_same_global_batch(launched: dict, reference: dict) -> None:
    ranks = [torch.load(launched["out"] / f"full_rank{r}.pt", weights_only=True) for r in (0, 1)]
    ref = reference["result"]
    for got in ranks:
        assert_close_weights(got["weights"], reference["weights"])
        assert len(got["history"]) == len(ref.history) == CONFIG.epochs
        for row, ref_row in zip(got["history"], no_seconds(ref.history)):
            assert row.keys() == ref_row.keys()
            for k in row:
                assert row[k] == pytest.approx(ref_row[k], rel=1e-6, abs=1e-6), (k, row, ref_row)
        assert got["best_epoch"] == ref.best_epoch
        # Sharded evaluation is exact: it equals a plain evaluation of the same weights, bit for bit.
        assert got["best_val"] == got["local_val"] and got["test"] == got["local_test"]
        assert got["best_val"]["n"] == 50 and got["test"]["n"] == 6
        assert got["device"] == "cpu"
        assert "exists: pass resume=True" in got["refused"]  # rank 0's check, raised on both ranks
    # every rank ends with the same weights and the same (reduced) metrics
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in ranks[0]["weights"])
    assert ranks[0]["history"] == ranks[1]["history"]


@needs_gloo
def test_only_rank_0_writes_files_and_reports(launched: dict, reference: dict) -> None:
    run = launched["out"] / "full"
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.csv", "metrics.json", "last.pt", "best.pt"}
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == CONFIG.epochs
    assert summary["steps_per_epoch"] == STEPS_PER_EPOCH and summary["global_steps"] == STEPS_PER_EPOCH * CONFIG.epochs
    rank0 = torch.load(launched["out"] / "full_rank0.pt", weights_only=True)
    assert summary["test"] == rank0["test"]
    assert_close_weights(torch.load(run / "best.pt", weights_only=True), rank0["weights"])
    # progress lines once (rank 0 only), not once per process
    for epoch in range(1, CONFIG.epochs + 1):
        assert launched["stdout"].count(f"epoch {epoch}/{CONFIG.epochs} |") == 1, launched["log"]
    assert launched["stdout"].count("best epoch") == 1, launched["log"]


@needs_gloo
def test_crashed_two_process_run_resumes_with_one_process(launched: dict, reference: dict) -> None:
    run = launched["out"] / "crash"
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == CRASH_AFTER_EPOCH, launched["log"]  # written before rank 1 went away
    assert_close_weights(last["model"], reference["after"][CRASH_AFTER_EPOCH])
    model = make_model(seed=99)  # everything must come from the checkpoint
    result = fit(model, TRAIN, VAL, CONFIG, run_dir=run, resume=True, progress=False)
    assert_close_weights(model.state_dict(), reference["weights"])
    final = torch.load(run / "last.pt", weights_only=True)["model"]
    assert_close_weights(final, reference["after"][CONFIG.epochs])
    assert [r["epoch"] for r in result.history] == list(range(1, CONFIG.epochs + 1))
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 1


@needs_gloo
def test_one_process_checkpoint_resumes_with_two_processes(launched: dict, reference: dict) -> None:
    for r in (0, 1):
        assert_close_weights(torch.load(launched["out"] / f"from_one_rank{r}.pt", weights_only=True),
                             reference["weights"])
    final = torch.load(launched["out"] / "from_one" / "last.pt", weights_only=True)
    assert final["state"]["epoch"] == CONFIG.epochs
    assert_close_weights(final["model"], reference["after"][CONFIG.epochs])


@needs_gloo
def test_per_rank_randomness_is_distinct_and_resumes_exactly(launched: dict) -> None:
    ranks = [torch.load(launched["out"] / f"noisy_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for got in ranks:
        assert all(torch.equal(got["resumed"][k], got["uninterrupted"][k]) for k in got["uninterrupted"])
    assert all(torch.equal(ranks[0]["resumed"][k], ranks[1]["resumed"][k]) for k in ranks[0]["resumed"])
    steps = STEPS_PER_EPOCH * CONFIG.epochs
    first, second = [r["drawn"][:steps] for r in ranks]
    assert len(first) == len(second) == steps and all(a != b for a, b in zip(first, second))
    # the interrupted run drew the same augmentation noise as the uninterrupted one, and so did its resumption
    for got in ranks:
        uninterrupted, interrupted_and_resumed = got["drawn"][:steps], got["drawn"][steps:]
        assert interrupted_and_resumed == uninterrupted


# ---------------------------------------------------------------------------------------------------------------
# In-process tests of the pieces


def test_sharded_batches_are_the_single_process_batches() -> None:
    n, batch = 23, 5
    dataset = TensorDataset(torch.arange(n))
    config = TrainConfig(epochs=1, batch_size=batch)
    reference_gen = torch.Generator().manual_seed(4)
    plain = train_loader(dataset, config, reference_gen, torch.device("cpu"))
    assert isinstance(plain.sampler, torch.utils.data.RandomSampler)  # one process: the plain loader
    for world in (1, 2, 3):
        gens = [torch.Generator().manual_seed(4) for _ in range(world)]
        loaders = [DataLoader(dataset, batch_sampler=ShardedBatchSampler(n, batch, gens[r], r, world),
                              generator=gens[r]) for r in range(world)]
        if world > 1:  # what fit uses under torchrun
            sharded = train_loader(dataset, config, torch.Generator(), torch.device("cpu"), rank=1, world_size=world)
            assert isinstance(sharded.batch_sampler, ShardedBatchSampler) and sharded.batch_sampler.rank == 1
        reference_gen.manual_seed(4)
        for epoch in range(2):  # the permutation changes per epoch, identically on every rank
            expected = [b[0].tolist() for b in plain]
            parts = [[b[0].tolist() for b in loader] for loader in loaders]
            assert all(len(p) == len(expected) == 5 for p in parts)
            for step, global_batch in enumerate(expected):
                samplers = [loader.batch_sampler for loader in loaders]
                shares = [s.shares(step) for s in samplers]  # type: ignore[union-attr]
                assert sum(c for c, _ in shares) == len(global_batch) and {t for _, t in shares} == {len(global_batch)}
                got = [x for (count, _), p in zip(shares, parts) for x in p[step][:count]]
                assert got == global_batch
                for (count, _), p in zip(shares, parts):
                    assert len(p[step]) == max(count, 1)  # an empty part gets one stand-in sample
            # every rank's generator is where the single-process loader left its own
            assert all(torch.equal(g.get_state(), reference_gen.get_state()) for g in gens)
    with pytest.raises(ValueError, match="at least the number of processes"):
        ShardedBatchSampler(n, 2, torch.Generator(), 0, 3)


class RandomItems(Dataset):
    """Items drawn from the worker's torch, numpy and python RNGs (a random per-item transform)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Tensor:
        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random()])


def test_loader_workers_draw_distinct_randomness_per_rank() -> None:
    config = TrainConfig(epochs=1, batch_size=4, num_workers=1)

    def first_item(rank: int, world: int) -> Tensor:
        loader = train_loader(RandomItems(), config, torch.Generator().manual_seed(0), torch.device("cpu"),
                              rank=rank, world_size=world)
        return next(iter(loader))[0]

    single, rank0, rank1 = first_item(0, 1), first_item(0, 2), first_item(1, 2)
    assert torch.equal(rank0, single)  # rank 0 keeps the single-process worker seeds
    assert (rank1 != rank0).all()  # every RNG differs on rank 1, although both loaders drew the same base seed


def test_shard_bounds_split_evenly_and_cover_everything() -> None:
    for count in range(0, 12):
        for world in range(1, 5):
            bounds = [shard_bounds(count, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_single_process_helpers_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.setup("cpu") and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main_process()
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    assert distributed.on_main_then_broadcast(lambda: {"a": 1}) == {"a": 1}
    with pytest.raises(KeyError, match="boom"):
        distributed.on_main_then_broadcast(lambda: {}["boom"])
    cpu = torch.device("cpu")
    assert distributed.device_for_rank(cpu) == cpu
    distributed.barrier()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        distributed.setup("cpu")


if __name__ == "__main__":  # run by torchrun from the `launched` fixture
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
