"""Speed and peak memory of a model, as notebook 10's table and the scripts in ``benchmarks/`` measure them: timed
calls within a budget, inference images/s, peak memory of a block, training and inference images/s per device as a
table row, the time a training curve reaches an accuracy, and the machine a timing was made on.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import itertools
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gevit_lib.train import TrainConfig, build_optimizer

__all__ = ["default_devices", "time_calls", "images_per_second", "PeakMemory", "peak_rss_bytes", "measure_speed",
           "speed_row", "speed_columns", "time_to_accuracy", "machine_description"]


def default_devices() -> list[str]:
    """Where speed is measured by default: the CPU, plus the GPU when there is one."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, device: str | torch.device = "cpu",
               budget_s: float | None = None) -> list[float]:
    """Seconds of each of up to ``repeats`` calls of ``fn`` (at least one; warm up first), none started once one
    more at the mean time would pass ``budget_s``."""
    dev = torch.device(device)
    times: list[float] = []
    while len(times) < repeats:
        if budget_s is not None and times and sum(times) * (len(times) + 1) / len(times) > budget_s:
            break
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def images_per_second(model: nn.Module, x: torch.Tensor, repeats: int = 3, warmup: int = 1) -> float:
    """Inference images/s of ``model`` on the batch ``x`` (eval mode, no gradients): the best of ``repeats`` timed
    calls after ``warmup`` untimed ones; the model's training mode is restored afterwards."""
    if repeats < 1 or len(x) == 0:
        raise ValueError(f"need repeats >= 1 and a non-empty batch, got {repeats} and shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(x)
            return len(x) / min(time_calls(lambda: model(x), repeats, x.device))
    finally:
        model.train(was_training)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _cpu_bytes_in_use() -> Callable[[], int]:
    """Bytes handed out by glibc malloc (``mallinfo2``: what tensors hold, not what the allocator keeps for reuse);
    without glibc, the resident set size."""
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
        mallinfo2.restype = _MallInfo2
        mallinfo2()
    except (OSError, AttributeError):
        return _current_rss_bytes

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.peak_bytes``: the peak above the block's start (CUDA:
    ``max_memory_allocated``; CPU: ``_cpu_bytes_in_use`` sampled every millisecond by a background thread)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._probe = _cpu_bytes_in_use()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._max = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._max = self._probe()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._probe())
            self._stop.wait(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self._max, self._probe()) - self._base


def measure_speed(model: nn.Module, input_shape: Sequence[int], num_classes: int, device: str | torch.device,
                  batch_size: int, steps: int = 3, budget_s: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Inference and training (cross-entropy, Adam) images/s and peak memory of a deep copy of ``model`` on random
    inputs: a warm-up on one image, then up to ``steps`` batches within ``budget_s``; training is not timed when one
    step (~3 inference batches) would exceed ``budget_s``. Returns ``infer_img_s``, ``train_img_s`` (None when not
    timed), ``peak_mem_mib`` (of training, else inference), ``timed_batches`` (inference, training) and ``note``."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=gen).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    m = copy.deepcopy(model).to(dev)

    def timed(step: Callable[[torch.Tensor, torch.Tensor], None]) -> tuple[float, int, int]:
        with PeakMemory(dev) as mem:
            step(x[:1], y[:1])  # warm-up
            times = time_calls(lambda: step(x, y), steps, dev, budget_s)
        return sum(times), len(times), mem.peak_bytes or 0

    m.eval()
    with torch.no_grad():
        infer_s, n_infer, peak = timed(lambda xb, yb: m(xb))
    result: dict[str, Any] = {"infer_img_s": batch_size * n_infer / infer_s, "train_img_s": None,
                              "timed_batches": [n_infer, 0], "note": ""}
    estimate = 3 * infer_s / n_infer
    params = [p for p in m.parameters() if p.requires_grad]
    if budget_s is not None and estimate > budget_s:
        result["note"] = f"training not timed (one step ~{estimate:.0f} s > budget {budget_s:g} s)"
    elif not params:
        result["note"] = "no trainable parameters"
    else:
        opt = build_optimizer(params, TrainConfig(epochs=1, optimizer="adam", lr=1e-4))  # as fit trains

        def train_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()

        m.train()
        train_s, n_train, peak = timed(train_step)
        result["train_img_s"] = batch_size * n_train / train_s
        result["timed_batches"][1] = n_train
    result["peak_mem_mib"] = peak / 2**20
    del m
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


def speed_row(model: nn.Module, input_shape: Sequence[int], num_classes: int, devices: Sequence[str],
              batch_size: int, steps: int = 3, budget_s: float | None = None, seed: int = 0) -> dict[str, Any]:
    """One table row: ``params``, :func:`measure_speed`'s numbers per device as ``<name>_<device>``, and ``note``."""
    row: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    notes = []
    for d in devices:
        s = measure_speed(model, input_shape, num_classes, d, batch_size, steps, budget_s, seed=seed)
        row.update({f"train_img_s_{d}": s["train_img_s"], f"infer_img_s_{d}": s["infer_img_s"],
                    f"peak_mem_mib_{d}": s["peak_mem_mib"]})
        if s["note"]:
            notes.append(f"{d}: {s['note']}")
    row["note"] = "; ".join(notes)
    return row


def speed_columns(devices: Sequence[str]) -> list[str]:
    """The speed columns of :func:`speed_row` for ``devices``, in table order."""
    return [f"{c}_{d}" for d in devices for c in ("train_img_s", "infer_img_s", "peak_mem_mib")]


def time_to_accuracy(seconds: Sequence[float], accuracy: Sequence[float], target: float) -> float | None:
    """The cumulative ``seconds`` at the end of the first epoch whose ``accuracy`` reaches ``target``, else None."""
    if len(seconds) != len(accuracy):
        raise ValueError(f"{len(seconds)} epoch times but {len(accuracy)} accuracies")
    return next((t for t, a in zip(itertools.accumulate(seconds), accuracy) if a >= target), None)


def machine_description(device: str | torch.device = "cpu") -> str:
    """What a timing was measured on: the CPU's model name, logical cores, torch's threads, and the CUDA GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads ({platform.system()})"
    dev = torch.device(device)
    return text + (f"; GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "")
