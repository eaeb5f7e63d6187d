"""Speed and memory measurement (gevit_lib.benchmark): budgets, measuring on a copy, the peak-memory probe; and
benchmarks/gevit_speed.py's side-by-side comparison with the original repository's code (``--original PATH``)."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gevit_lib.benchmark import (PeakMemory, images_per_second, machine_description, measure_speed, speed_columns,
                                 speed_row, time_calls, time_to_accuracy)

REPO = Path(__file__).resolve().parents[1]


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_measure_speed_budget_and_copy() -> None:
    model = _tiny()
    before = [p.clone() for p in model.parameters()]
    speed = measure_speed(model, (1, 4, 4), 3, "cpu", batch_size=4, steps=2)
    assert speed["infer_img_s"] > 0 and speed["train_img_s"] > 0 and speed["peak_mem_mib"] >= 0
    assert speed["timed_batches"] == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # measured on a copy
    slow = measure_speed(model, (1, 4, 4), 3, "cpu", batch_size=4, steps=2, budget_s=1e-9)
    assert slow["train_img_s"] is None and "training not timed" in slow["note"]
    assert slow["timed_batches"] == [1, 0]  # at least one inference batch, even over budget


def test_measure_speed_without_trainable_parameters() -> None:
    model = _tiny().requires_grad_(False)
    speed = measure_speed(model, (1, 4, 4), 3, "cpu", batch_size=2, steps=1)
    assert speed["train_img_s"] is None and speed["note"] == "no trainable parameters"


def test_time_calls_stops_at_the_budget() -> None:
    calls = []

    def sleep() -> None:
        calls.append(1)
        time.sleep(0.01)

    times = time_calls(sleep, repeats=50, budget_s=0.1)
    n = len(times)
    assert n == len(calls) and 1 <= n < 50 and all(t >= 0.01 for t in times)
    assert sum(times) * (n + 1) / n > 0.1  # one more call at the mean time would pass the budget
    assert n == 1 or sum(times[:-1]) * n / (n - 1) <= 0.1  # ... and the last one did not
    assert len(time_calls(sleep, repeats=3)) == 3  # no budget: every repeat
    assert len(time_calls(sleep, repeats=3, budget_s=1e-9)) == 1  # always at least one call


class _Sleeper(torch.nn.Module):
    """Sleeps the next of ``delays`` per call; records its training mode and whether gradients were on."""

    def __init__(self, delays: list[float]) -> None:
        super().__init__()
        self.delays, self.seen = list(delays), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        time.sleep(self.delays.pop(0))
        return x


def test_images_per_second_is_the_best_repeat_after_warmup() -> None:
    model = _Sleeper([0.3, 0.1, 0.02, 0.1])  # warm-up (slowest, untimed), then three timed calls
    rate = images_per_second(model.train(), torch.zeros(8, 1), repeats=3, warmup=1)
    assert 8 / 0.02 * 0.5 < rate <= 8 / 0.02  # the shortest timed call, not the mean or the warm-up
    assert model.seen == [(False, False)] * 4 and not model.delays  # eval mode, no gradients, 1 + 3 calls
    assert model.training  # training mode restored
    with pytest.raises(ValueError, match="repeats"):
        images_per_second(model, torch.zeros(8, 1), repeats=0)


def test_peak_memory_sees_a_freed_allocation() -> None:
    """A 64 MiB tensor allocated and freed inside the block shows in the peak, not in the memory at its end."""
    with PeakMemory("cpu") as mem:
        x = torch.ones(16 * 2**20)  # 64 MiB of float32, written so the pages are touched
        time.sleep(0.02)  # the sampler runs every millisecond
        del x
    assert mem.peak_bytes is not None and 60 <= mem.peak_bytes / 2**20 < 200
    with PeakMemory("cpu") as idle:
        time.sleep(0.01)
    assert idle.peak_bytes is not None and idle.peak_bytes / 2**20 < 16


def test_speed_row_columns() -> None:
    row = speed_row(_tiny(), (1, 4, 4), 3, ["cpu"], batch_size=2, steps=1, budget_s=1e-9)
    assert row["params"] == 16 * 3 + 3
    assert [c for c in row if c not in ("params", "note")] == speed_columns(["cpu"])
    assert row["train_img_s_cpu"] is None and row["note"].startswith("cpu: training not timed")
    assert speed_columns(["cpu", "cuda"])[3:] == ["train_img_s_cuda", "infer_img_s_cuda", "peak_mem_mib_cuda"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_measure_speed_on_cuda() -> None:
    speed = measure_speed(_tiny(), (1, 4, 4), 3, "cuda", batch_size=8, steps=2)
    assert speed["infer_img_s"] > 0 and speed["train_img_s"] > 0 and speed["peak_mem_mib"] >= 0


def test_time_to_accuracy_is_the_end_of_the_first_epoch_at_the_target() -> None:
    seconds, acc = [10.0, 20.0, 30.0, 40.0], [50.0, 82.3, 80.0, 90.0]
    assert time_to_accuracy(seconds, acc, 82.3) == 30.0  # cumulative: 10 + 20; reaching it exactly counts
    assert time_to_accuracy(seconds, acc, 85.0) == 100.0  # the dip below does not matter, the first epoch does
    assert time_to_accuracy(seconds, acc, 95.0) is None
    assert time_to_accuracy([], [], 1.0) is None
    with pytest.raises(ValueError, match="3 epoch times but 2 accuracies"):
        time_to_accuracy([1.0, 2.0, 3.0], [1.0, 2.0], 1.0)


def test_machine_description_names_cores_and_threads() -> None:
    text = machine_description("cpu")
    assert f"{torch.get_num_threads()} torch threads" in text and "GPU" not in text


# ---- benchmarks/gevit_speed.py --original --------------------------------------------------------------------
def _gevit_speed():
    spec = importlib.util.spec_from_file_location("gevit_speed", REPO / "benchmarks" / "gevit_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_original_path_is_checked(tmp_path) -> None:
    speed = _gevit_speed()
    with pytest.raises(speed.OriginalCheckoutError, match="no such directory"):
        speed.original_checkout(tmp_path / "absent")
    (tmp_path / "file").write_text("")
    with pytest.raises(speed.OriginalCheckoutError, match="not a directory"):
        speed.original_checkout(tmp_path / "file")
    (tmp_path / "src" / "models").mkdir(parents=True)
    with pytest.raises(speed.OriginalCheckoutError, match=r"not a checkout of the original .*\(no src/g_selfatt\)"):
        speed.original_checkout(tmp_path)
    # the command line: one line naming the problem, before anything is measured
    proc = subprocess.run([sys.executable, "benchmarks/gevit_speed.py", "--original", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: --original {tmp_path}: not a checkout of the original GE-ViT "
                                                "repository (no src/g_selfatt)"]


def test_original_import_failure_is_one_line(tmp_path) -> None:
    """A checkout whose code needs a package this environment lacks: the run stops with its name."""
    (tmp_path / "src" / "g_selfatt").mkdir(parents=True)
    (tmp_path / "src" / "models").mkdir()
    (tmp_path / "src" / "model.py").write_text("import no_such_package_for_gevit_speed\n")
    proc = subprocess.run([sys.executable, "benchmarks/gevit_speed.py", "--original", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --original {tmp_path}: the original code needs the package 'no_such_package_for_gevit_speed', "
        "which this Python environment lacks (install it there to run --original)")
    assert "Traceback" not in proc.stderr


def test_speed_table_ratios_against_the_original() -> None:
    speed = _gevit_speed()
    base = dict(device="cpu", group="p4", patch=5, batch=8, params=100, param_sections={"lift": 60, "blocks.0": 40})
    rows = [{**base, "impl": "fast", "backend": "kernel", "eval_forward_s": 0.1, "train_step_s": 1.0, "peak_gib": 0.1},
            {**base, "impl": "plain", "eval_forward_s": 1.0, "train_step_s": 8.0, "peak_gib": 1.0},
            {**base, "impl": "original", "eval_forward_s": 1.5, "train_step_s": 12.0, "peak_gib": 2.0},
            {**base, "patch": 9, "impl": "fast", "eval_forward_s": 0.1, "train_step_s": 1.0, "peak_gib": 0.1},
            {**base, "patch": 9, "impl": "original", "error": ["out of memory"]}]
    checkout = {"commit": "1cee23428b19af200e497e81bb47ddf2265482b4", "modified": False}
    lines = speed.table(rows, checkout).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    head = cells[0]
    fast, plain, orig = (dict(zip(head, c)) for c in cells[2:5])
    assert (fast["speed-up vs plain (train)"], fast["memory vs plain"]) == ("8.0x", "0.10")
    assert (fast["speed-up vs original (train)"], fast["memory vs original"]) == ("12.0x", "0.05")
    assert (plain["speed-up vs original (train)"], plain["memory vs original"]) == ("1.5x", "0.50")
    assert orig["impl"] == "original repository code (commit 1cee23428b19)" and orig["params"] == "100 (= ours)"
    assert orig["speed-up vs original (train)"] == ""
    text = speed.reference_text(rows, checkout)
    assert "commit 1cee23428b19af200e497e81bb47ddf2265482b4" in text
    assert "Missing: the original code on cpu p4 P=9: out of memory" in text
    assert "Parameters p4 P=5: original 100, ours 100 (the same in every layer)" in text
    # parameters that differ: the row and the note say so, and in which layer
    rows[2] = {**rows[2], "params": 110, "param_sections": {"lift": 60, "blocks.0": 50}}
    assert "110 (ours 100)" in speed.table(rows, checkout)
    assert "they differ in blocks.0: ours 40, original 50" in speed.reference_text(rows, checkout)
    # without --original: no original columns, and the reference is said to be the plain transcription
    assert "vs original" not in speed.table(rows[:2])
    assert "not the original repository's code" in speed.reference_text(rows[:2], None)


def test_cpu_time_per_step_and_its_text() -> None:
    """getrusage differences divided by the number of steps; the text gives the OS's share per CPU row."""
    from types import SimpleNamespace as NS

    speed = _gevit_speed()
    before = NS(ru_utime=10.0, ru_stime=1.0, ru_minflt=1000, ru_majflt=2)
    after = NS(ru_utime=13.0, ru_stime=7.0, ru_minflt=301000, ru_majflt=2)
    usage = speed.cpu_usage(before, after, 3)
    assert usage == pytest.approx({"train_user_s": 1.0, "train_system_s": 2.0, "train_page_faults": 100000.0})
    base = dict(device="cpu", group="p4", patch=5, batch=8)
    rows = [{**base, "impl": "fast", "backend": "kernel", "train_user_s": 0.6, "train_system_s": 0.0,
             "train_page_faults": 12.0},
            {**base, "impl": "original", **usage},
            {**base, "impl": "plain", "error": ["out of memory"]},
            {**base, "device": "cuda", "impl": "fast", "train_user_s": 0.1, "train_system_s": 0.1,
             "train_page_faults": 1.0}]
    text = speed.cpu_time_text(rows, {"commit": "1cee23428b19af200e497e81bb47ddf2265482b4"})
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines == ["- p4 P=5 batch 8 fast: user 0.60 s, system 0.00 s (0% in the OS), 12 page faults",
                     "- p4 P=5 batch 8 original repository code (commit 1cee23428b19): user 1.00 s, system 2.00 s "
                     "(67% in the OS), 100,000 page faults"]
    assert speed.cpu_time_text([rows[2], rows[3]]) == ""  # no CPU row measured: no block


_FAULTS_CHILD = """
import resource
for i in range(5):  # allocate, touch and free 64 MiB; count the page faults of the last four rounds
    if i == 1:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = b"\\x01" * (64 << 20)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="--keep-freed-memory sets glibc's malloc variables")
def test_keep_freed_memory_reaches_the_child_and_saves_its_page_faults() -> None:
    """A block freed and allocated again costs a page fault per page by default (glibc hands it back to the OS);
    with --keep-freed-memory's environment the second and later rounds reuse it."""
    speed = _gevit_speed()
    assert speed.child_env({}) == dict(os.environ)

    def faults(keep: bool) -> int:
        env = speed.child_env({"keep_memory": keep})
        return int(subprocess.run([sys.executable, "-c", _FAULTS_CHILD], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    default, kept = faults(False), faults(True)
    if default < 4 * 8000:
        pytest.skip(f"this machine backs fresh memory with huge pages ({default} faults for 4 x 64 MiB)")
    assert kept < 2000, (kept, default)


def test_lockstep_summary_is_the_median_of_per_round_ratios() -> None:
    speed = _gevit_speed()
    ours = [[1.0, 1.2, 1.1], [2.0], [1.0]]  # per round: the turn's timed steps
    original = [[11.0], [30.0], [12.0]]  # per-round ratios 10x, 15x, 12x
    summary = speed.lockstep_summary(ours, original)
    assert summary["ratio"] == pytest.approx(12.0) and summary["rounds"] == 3
    assert summary["ratio_q1"] <= 12.0 <= summary["ratio_q3"]
    assert summary["ours_s"] == pytest.approx(1.1) and summary["original_s"] == pytest.approx(12.0)
    text = speed.lockstep_text([{"device": "cpu", "group": "p4", "patch": 5, "batch": 8, **summary},
                                {"device": "cpu", "group": "p4m", "patch": 5, "batch": 2, "reduced_batch": True,
                                 **summary},
                                {"device": "cpu", "group": "p4", "patch": 9, "batch": 8, "error": "a lockstep worker "
                                 "stopped: MemoryError"}])
    assert "cpu p4 P=5 batch 8: train step ours 1.100 s, original 12.000 s (medians)" in text
    assert "median 12.0x" in text and "3 rounds" in text
    # where the original's rows had to run at a smaller batch, both step at that batch, and the line says so
    assert "cpu p4m P=5 batch 2 (both; the original's rows ran at this batch for memory): train step ours" in text
    assert "cpu p4 P=9 batch 8: not measured (a lockstep worker stopped: MemoryError)" in text


def test_lockstep_workers_take_turns_and_report_failures() -> None:
    """Two persistent workers (here both ours: the protocol, not the original code) step in turn; a worker that
    cannot build its model stops the run with its last error line."""
    speed = _gevit_speed()
    spec = dict(device="cpu", group="p4", patch=5, batch=1, impl="fast", threads=1, round_seconds=0)
    times = speed.lockstep([spec, {**spec, "group": "z2"}], rounds=2)
    assert [len(t) for t in times] == [2, 2] and all(len(r) == 1 and r[0] > 0 for t in times for r in t)
    with pytest.raises(RuntimeError, match="a lockstep worker stopped: .*no_such_group"):
        speed.lockstep([spec, {**spec, "group": "no_such_group"}], rounds=1)


@pytest.mark.skipif(not os.environ.get("GEVIT_ORIGINAL"),
                    reason="set GEVIT_ORIGINAL to a checkout of the original repository (WouterBant/GEVit-DL2-Project) "
                           "to build its model beside ours")
def test_original_p4_model_has_our_parameters() -> None:
    from gevit_lib.models.gevit import build_gevit

    speed = _gevit_speed()
    checkout = speed.original_checkout(os.environ["GEVIT_ORIGINAL"])
    row = speed.run_child(dict(group="p4", patch=5, batch=1, impl="original", original_src=checkout["src"],
                               device="cpu", repeats=1, threads=2))
    assert "error" not in row, row["error"]
    assert "original_src" not in row  # no path of this machine in the results
    assert row["backend"] == "original" and row["train_step_s"] > 0 and row["eval_forward_s"] > 0
    ours = build_gevit("rotmnist", "p4", patch_size=5)
    assert row["params"] == sum(p.numel() for p in ours.parameters())
    assert row["param_sections"] == speed.param_sections(ours, original=False)
    for group, patch in (("p4", 9), ("p4m", 5)):  # the benchmark's other configurations: built only
        built = speed.run_child(dict(group=group, patch=patch, batch=1, impl="original", original_src=checkout["src"],
                                     device="cpu", repeats=1, build_only=True))
        assert "error" not in built, built["error"]
        ours = build_gevit("rotmnist", group, patch_size=patch)
        assert built["param_sections"] == speed.param_sections(ours, original=False), (group, patch)
