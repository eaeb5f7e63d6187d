"""Training and evaluation loop shared by every experiment: ``fit``, ``evaluate``, ``predict``.

One small loop (nanoGPT style) for GE-ViT, the post's ViT, post-hoc finetuning and the hybrids:

- seeded and deterministic on CPU (python / numpy / torch seeds, an explicit generator for shuffling, another for
  augmentation, seeded workers);
- optimizers and schedules the post uses (Adam, AdamW, SGD + momentum (+ Nesterov); constant, linear warm-up +
  cosine, multistep), all stepped per batch through one ``LambdaLR``;
- optional mixed precision on CUDA (bf16 preferred, fp16 with a GradScaler as fallback; always fp32 on CPU);
- best-on-validation selection (highest accuracy, ties broken by lower loss); the test set, if given, is evaluated
  once at the end with the selected weights and never used for selection (unlike the upstream code, SPEC §3.5);
- a run folder with ``config.json``, ``metrics.csv``, ``metrics.json``, ``best.pt`` and a resumable ``last.pt``,
  all written atomically every epoch; ``resume=True`` continues an interrupted run bit-identically on CPU;
- a non-finite training loss stops the run with ``NonFiniteLossError`` (the reference skipped such batches).

Multi-process training: the same ``fit`` runs unchanged under ``torchrun --nproc-per-node N`` (one process per
GPU, NCCL; or CPU processes, gloo), using ``gevit_lib.distributed``. A run with N processes computes the same
optimizer steps as a single process, up to float rounding:

- ``config.batch_size`` is the *global* batch (one optimizer step); each process takes a contiguous part of it.
  ``ShardedBatchSampler`` cuts the single-process loader's own batches (same seeded generator on every rank, same
  permutation per epoch), so every step sees exactly the samples it would see in one process.
- the model is wrapped in ``DistributedDataParallel``; each rank's mean loss is weighted by
  ``rank_count * N / global_count`` so that DDP's gradient average equals the mean over the global batch, also for
  uneven splits and the last, smaller batch (nothing is dropped or padded; a rank left with no sample of a tiny
  last batch runs one sample with weight 0 to join the gradient all-reduce).
- validation/test: each rank evaluates whole batches of the single-process evaluation (no padding, no
  duplicates); per-batch loss sums are gathered and added in the single-process order, so the metrics (and hence
  best-epoch selection and early stopping) are exactly the single-process values, identical on every rank.
- training metrics are reduced over ranks (sum of loss * n, correct, n); BatchNorm-style buffers are broadcast
  from rank 0 after every epoch so every rank evaluates and keeps the weights rank 0 saves.
- only rank 0 reads and writes ``run_dir`` (the checkpoint is broadcast to the others; errors reach every rank)
  and shows progress and logs; the others wait at a barrier after every epoch's files are written.
- checkpoints hold global state (epoch, global step, loader generator, rank 0's RNG), never per-rank state, so a
  run resumes with any number of processes and continues the same global sequence of batches. Randomness inside a
  step (dropout, ``augment``) comes from per-rank streams: rank 0 uses the single-process stream, rank r > 0
  reseeds from (seed, r, epoch) each epoch. Those draws differ from a single-process run, so the equivalence above
  is for the data order and the maths of each step; BatchNorm statistics are per rank (as usual with DDP).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, TensorDataset
from tqdm import tqdm

from gevit_lib import __version__
from gevit_lib import distributed as dist_utils
from gevit_lib.files import atomic_torch_save, atomic_write

__all__ = [
    "TrainConfig",
    "FitResult",
    "NonFiniteLossError",
    "fit",
    "evaluate",
    "predict",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "seed_everything",
    "resolve_device",
    "resolve_precision",
    "autocast",
    "train_loader",
    "eval_loader",
    "ShardedBatchSampler",
    "shard_bounds",
]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "multistep")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_FORMAT = "gevit-train/1"
# Fields that may differ between an interrupted run and its resumption (they do not change the maths of the
# epochs already run; changing ``epochs`` with a cosine schedule does change the remaining LR curve).
RESUMABLE_CHANGES = frozenset({"epochs", "early_stopping_patience", "device", "num_workers", "eval_batch_size",
                               "label"})

# A dataset of (input, label) pairs, or a pair of tensors (inputs, labels).
Data = Union[Dataset, tuple[Tensor, Tensor]]
Augment = Callable[[Tensor, torch.Generator], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stops instead of skipping the batch."""

    def __init__(self, value: float, epoch: int, step: int, global_step: int, label: str = "") -> None:
        self.value, self.epoch, self.step, self.global_step = value, epoch, step, global_step
        where = f" in run {label!r}" if label else ""
        super().__init__(
            f"training loss is {value} at epoch {epoch}, step {step} (global step {global_step}){where}. "
            f"The run was stopped before this step changed the weights; the checkpoint of the previous epoch is "
            f"intact. Lower the learning rate, set grad_clip, check the inputs for NaN/inf, or use "
            f"precision='bf16'/'fp32' instead of 'fp16'."
        )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (written to ``config.json``).

    ``milestones`` are 0-based epoch indices as in ``torch.optim.lr_scheduler.MultiStepLR``: ``(30,)`` multiplies
    the LR by ``gamma`` from the 31st epoch on. ``warmup_epochs`` may be fractional (it is converted to steps).
    ``select_initial``: evaluate the model before training and count it as the starting best (the post's
    finetuning); if no epoch beats it, the initial weights are restored (the reference kept the last epoch's).
    """

    epochs: int
    batch_size: int = 64
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    schedule: str = "constant"  # "constant" | "warmup_cosine" | "multistep"
    warmup_epochs: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    precision: str = "auto"  # "fp32" | "bf16" | "fp16" | "auto" (bf16 on capable GPUs, fp16 on others, fp32 on CPU)
    seed: int = 0
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N" | "auto"
    num_workers: int = 0
    eval_batch_size: int | None = None  # default: batch_size
    early_stopping_patience: int | None = None  # epochs without validation improvement before stopping
    grad_clip: float | None = None  # max global grad norm
    select_initial: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            problems.append(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            problems.append("nesterov=True needs optimizer='sgd' and momentum > 0")
        if not 0 <= self.warmup_epochs <= self.epochs:
            problems.append(f"warmup_epochs must lie in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 0 for m in self.milestones):
            problems.append(f"milestones must be increasing non-negative epoch indices, got {self.milestones}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            problems.append(f"early_stopping_patience must be >= 1 or None, got {self.early_stopping_patience}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


@dataclass
class FitResult:
    """What ``fit`` returns. ``best_epoch`` is 0 when the initial weights were kept (``select_initial``), and the
    last epoch when there is no validation data. Accuracies are fractions in [0, 1]."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val: dict[str, float] | None
    initial_val: dict[str, float] | None
    test: dict[str, float] | None
    epochs_completed: int
    stopped_early: bool
    device: str
    precision: str
    run_dir: Path | None = None
    seconds: float = 0.0  # wall time of the epochs run by this call


# ---------------------------------------------------------------------------------------------------------------
# Seeding, device, precision


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a CUDA device without CUDA is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``"auto"`` to bf16 (CUDA with bf16), fp16 (older CUDA) or fp32 (CPU). Mixed precision is CUDA only."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision {precision!r} needs a CUDA device (got {device}); use 'fp32' or 'auto'")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# Data


def _as_dataset(data: Data, what: str) -> Dataset:
    if isinstance(data, Dataset):
        dataset = data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        inputs, labels = data
        if len(inputs) != len(labels):
            raise ValueError(f"{what}: {len(inputs)} inputs but {len(labels)} labels")
        dataset = TensorDataset(inputs, labels)
    else:
        raise TypeError(f"{what} must be a torch Dataset of (input, label) pairs or a tuple (inputs, labels), "
                        f"got {type(data).__name__}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{what} is empty")
    return dataset


def _seed_worker(worker_id: int, rank: int = 0) -> None:
    """Seed numpy and ``random`` in a data-loader worker from its torch seed (itself drawn from the loader's
    generator), so worker-side augmentation is reproducible. Every rank's loader draws the same seeds, so ranks
    > 0 first derive their own torch seed from (seed, rank): per-item random transforms differ between ranks."""
    seed = torch.initial_seed()
    if rank > 0:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
        torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed % 2**32)


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and end of rank ``rank``'s contiguous part of ``count`` items split as evenly as possible (the first
    ``count % world_size`` ranks get one more)."""
    base, extra = divmod(count, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class ShardedBatchSampler(Sampler[list[int]]):
    """This process's part of every batch of the single-process training loader.

    The global batches are those of ``DataLoader(shuffle=True, batch_size, generator)`` (the same ``RandomSampler``
    and ``BatchSampler``, so the same draws from ``generator``); every rank holds an identically seeded generator,
    so all ranks see the same permutation each epoch (the generator's state advances per epoch, which plays the
    role of ``DistributedSampler.set_epoch`` and is checkpointed). Rank r takes ``shard_bounds(len(batch), r, N)``
    of each batch; when that part is empty (a last batch smaller than N) it gets the batch's first sample, which
    the training loop weights by 0 (``shares`` tells it the true counts).
    """

    def __init__(self, num_samples: int, batch_size: int, generator: torch.Generator, rank: int,
                 world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if batch_size < world_size:
            raise ValueError(f"batch_size={batch_size} is the global batch split over {world_size} processes; it "
                             f"must be at least the number of processes")
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.batches = BatchSampler(RandomSampler(range(num_samples), generator=generator), batch_size,
                                    drop_last=False)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            lo, hi = shard_bounds(len(batch), self.rank, self.world_size)
            yield batch[lo:hi] if hi > lo else batch[:1]

    def shares(self, step: int) -> tuple[int, int]:
        """(samples of this rank that count, samples in the global batch) for the 0-based ``step`` of an epoch."""
        total = min(self.batch_size, self.num_samples - step * self.batch_size)
        lo, hi = shard_bounds(total, self.rank, self.world_size)
        return hi - lo, total


def train_loader(dataset: Dataset, config: TrainConfig, generator: torch.Generator, device: torch.device, *,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled training batches, all randomness drawn from ``generator``. With ``world_size > 1`` this rank's
    part of the same global batches (``ShardedBatchSampler``)."""
    common = dict(generator=generator, num_workers=config.num_workers,
                  worker_init_fn=functools.partial(_seed_worker, rank=rank),
                  pin_memory=device.type == "cuda")
    if world_size == 1:
        return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, **common)  # type: ignore[arg-type]
    n = len(dataset)  # type: ignore[arg-type]
    sampler = ShardedBatchSampler(n, config.batch_size, generator, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, **common)  # type: ignore[arg-type]


def eval_loader(data: Data | DataLoader, batch_size: int, device: torch.device, num_workers: int = 0,
                what: str = "data") -> DataLoader:
    """Batches in dataset order. A private generator keeps evaluation from consuming the global torch RNG."""
    if isinstance(data, DataLoader):
        return data
    return DataLoader(_as_dataset(data, what), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0), worker_init_fn=_seed_worker,
                      pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------------------------------------------
# Optimizers and schedules


def build_optimizer(params: nn.Module | Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters with ``requires_grad=True`` (frozen ones are left out)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter has requires_grad=False")
    if config.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` for the 0-based optimizer ``step``.

    constant: 1. multistep: ``gamma ** (number of milestones <= epoch index)``. warmup_cosine: linear warm-up
    reaching 1 at the last warm-up step, then a half cosine that would reach 0 one step after the last step.
    """
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "multistep":
        epoch = step // steps_per_epoch
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    total = config.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Per-batch ``LambdaLR`` following ``lr_factor`` (call ``.step()`` after every optimizer step)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def factor(step: int) -> float:
        return lr_factor(step, config, steps_per_epoch)

    return LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _eval_pass(model: nn.Module, loader: DataLoader, device: torch.device, precision: str, loss_fn: LossFn,
               keep_logits: bool, progress: bool, desc: str, shard: tuple[int, int] | None = None
               ) -> tuple[dict[str, float], Tensor | None, Tensor | None]:
    """Metrics over ``loader``. ``shard=(first, total)``: ``loader`` holds batches ``first, first+1, ...`` of
    ``total`` batches split over the processes; the result is reduced over them, adding the per-batch loss sums
    in batch order, so it is bit-identical to one process going through all ``total`` batches."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    batch_sums = torch.zeros(shard[1] if shard else 0, dtype=torch.float64, device=device)
    all_logits, all_labels = [], []
    try:
        for i, (x, y) in enumerate(tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float()
            if shard is None:
                loss_sum += loss_fn(logits, y).double() * len(y)
            else:
                batch_sums[shard[0] + i] = loss_fn(logits, y).double() * len(y)
            correct += (logits.argmax(dim=-1) == y).sum()
            n += len(y)
            if keep_logits:
                all_logits.append(logits.cpu())
                all_labels.append(y.cpu())
    finally:
        model.train(was_training)
    if shard is not None:  # each slot has exactly one non-zero contributor, so the sum over ranks is exact
        dist_utils.all_reduce_sum(batch_sums)
        counts = dist_utils.all_reduce_sum(torch.stack([correct, torch.tensor(n, device=device)]))
        correct, n = counts[0], int(counts[1].item())
        for value in batch_sums:
            loss_sum += value
    metrics = {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "n": n}
    if keep_logits:
        return metrics, torch.cat(all_logits), torch.cat(all_labels)
    return metrics, None, None


def evaluate(model: nn.Module, data: Data | DataLoader, *, batch_size: int = 256, device: str = "cpu",
             precision: str = "fp32", progress: bool = False, loss_fn: LossFn | None = None,
             num_workers: int = 0) -> dict[str, float]:
    """Mean loss (cross-entropy unless ``loss_fn``), accuracy (fraction) and count on ``data``, in eval mode.

    Moves ``model`` to ``device``; restores its train/eval mode afterwards. Does not consume the global RNG.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    loader = eval_loader(data, batch_size, dev, num_workers)
    metrics, _, _ = _eval_pass(model, loader, dev, prec, loss_fn or nn.CrossEntropyLoss(), False, progress,
                               "eval")
    return metrics


def predict(model: nn.Module, data: Data | DataLoader, *, batch_size: int = 256, device: str = "cpu",
            precision: str = "fp32", progress: bool = False) -> tuple[Tensor, Tensor]:
    """Logits (float32, on CPU, dataset order) and labels for ``data``, in eval mode."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    loader = eval_loader(data, batch_size, dev)
    _, logits, labels = _eval_pass(model, loader, dev, prec, nn.CrossEntropyLoss(), True, progress, "predict")
    assert logits is not None and labels is not None
    return logits, labels


def _sharded_eval(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, precision: str,
                  loss_fn: LossFn, num_workers: int, progress: bool, desc: str) -> dict[str, float]:
    """Metrics of ``eval_loader(dataset, batch_size)`` with its batches split over the processes in contiguous
    blocks (whole batches: the same batch compositions, hence the same logits as a single process)."""
    n = len(dataset)  # type: ignore[arg-type]
    total = math.ceil(n / batch_size)
    lo, hi = shard_bounds(total, dist_utils.rank(), dist_utils.world_size())
    batches = [list(range(j * batch_size, min(n, (j + 1) * batch_size))) for j in range(lo, hi)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
    metrics, _, _ = _eval_pass(model, loader, device, precision, loss_fn, False, progress, desc, shard=(lo, total))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class _State:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs."""

    epoch: int = 0  # completed epochs
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: dict[str, float] | None = None
    best_weights: dict[str, Tensor] | None = None  # CPU copy
    initial_val: dict[str, float] | None = None
    since_best: int = 0
    stopped_early: bool = False


def _cpu_copy(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _is_better(val: dict[str, float], best: dict[str, float] | None) -> bool:
    """Higher accuracy wins; equal accuracy is decided by lower loss."""
    if best is None:
        return True
    return val["accuracy"] > best["accuracy"] or (val["accuracy"] == best["accuracy"] and val["loss"] < best["loss"])


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                 scaler: torch.amp.GradScaler | None, loss_fn: LossFn, augment: Augment | None,
                 augment_generator: torch.Generator, device: torch.device, precision: str, config: TrainConfig,
                 epoch: int, state: _State, progress: bool,
                 shares: Callable[[int], tuple[int, int]] | None = None) -> dict[str, float]:
    """One epoch. ``shares(step)`` (multi-process only): (this rank's samples, global batch size) of a step."""
    world = dist_utils.world_size() if shares is not None else 1
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_sum, n = 0.0, 0
    correct = torch.zeros((), dtype=torch.long, device=device)
    bar = tqdm(loader, desc=f"{config.label + ' ' if config.label else ''}epoch {epoch}/{config.epochs}",
               leave=False, disable=not progress, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, augment_generator)
        with autocast(device, precision):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        if shares is None:
            count = len(y)
            loss_value = loss.item()
        else:
            # DDP averages gradients over ranks: weighting each rank's mean loss by count * world / total makes
            # that average the mean over the global batch (weight 1 for evenly split batches).
            count, total = shares(step - 1)
            step_sum = dist_utils.all_reduce_sum(loss.detach().double() * count).item()  # sum of loss * n
            loss_value = step_sum / total
            if count * world != total:
                loss = loss * (count * world / total)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(loss_value, epoch, step, state.global_step + 1, config.label)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
        scheduler.step()
        state.global_step += 1
        if shares is None:
            loss_sum += loss_value * len(y)
        else:
            loss_sum += step_sum
        if count:  # a rank's stand-in sample (count 0) is not counted
            correct += (logits.detach().argmax(dim=-1) == y).sum()
        n += count
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    if shares is not None:
        counts = dist_utils.all_reduce_sum(torch.stack([correct, torch.tensor(n, device=device)]))
        correct, n = counts[0], int(counts[1].item())
    return {"train_loss": loss_sum / n, "train_acc": correct.item() / n}


def _rng_state(loader_generator: torch.Generator, augment_generator: torch.Generator) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": loader_generator.get_state(),
        "augment": augment_generator.get_state(),
    }


def _set_rng_state(rng: dict[str, Any], loader_generator: torch.Generator,
                   augment_generator: torch.Generator) -> None:
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    loader_generator.set_state(rng["loader"])
    if augment_generator.device.type == "cpu" or len(rng["augment"]) == len(augment_generator.get_state()):
        augment_generator.set_state(rng["augment"])


def _seed_rank_streams(seed: int, rank: int, epoch: int, augment_generator: torch.Generator) -> None:
    """Per-rank randomness (dropout, augmentation) for rank > 0, derived from (seed, rank, epoch) so that it is
    distinct from the other ranks and reproducible after a resume without storing per-rank state."""
    rank_seed = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    seed_everything(rank_seed)
    augment_generator.manual_seed(rank_seed + 2)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a resumable training checkpoint of format {CHECKPOINT_FORMAT!r}")
    return ckpt


def _load_checkpoint(path: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: LambdaLR, scaler: torch.amp.GradScaler | None, loader_generator: torch.Generator,
                     augment_generator: torch.Generator, ckpt: dict[str, Any] | None = None) -> _State:
    """Restore a run from ``path`` (or from ``ckpt``, that file's already-read content)."""
    if ckpt is None:
        ckpt = _read_checkpoint(path)
    old, new = ckpt["config"], config.to_dict()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {path}: the config changed ({diffs}). Only {sorted(RESUMABLE_CHANGES)} "
                         f"may change on resume; use a new run_dir for a different run.")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"cannot resume {path}: the checkpoint does not fit this model ({exc})") from exc
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"], loader_generator, augment_generator)
    s = ckpt["state"]
    return _State(epoch=s["epoch"], global_step=s["global_step"], history=s["history"], best_epoch=s["best_epoch"],
                  best_val=s["best_val"], best_weights=ckpt["best_weights"], initial_val=s["initial_val"],
                  since_best=s["since_best"], stopped_early=s["stopped_early"])


def _save_checkpoint(path: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: LambdaLR, scaler: torch.amp.GradScaler | None, loader_generator: torch.Generator,
                     augment_generator: torch.Generator, state: _State) -> None:
    s = {k: getattr(state, k) for k in ("epoch", "global_step", "history", "best_epoch", "best_val",
                                         "initial_val", "since_best", "stopped_early")}
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(loader_generator, augment_generator),
        "state": s,
        "best_weights": state.best_weights,
    }, path)


CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


def _write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _log_line(config: TrainConfig, record: dict[str, float], improved: bool, eta: float) -> str:
    parts = [f"{config.label + ' ' if config.label else ''}epoch {record['epoch']}/{config.epochs}",
             f"lr {record['lr']:.2e}",
             f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}%"]
    if record["val_loss"] is not None:
        parts.append(f"val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}%" + (" *" if improved else ""))
    parts += [f"{record['seconds']:.1f} s/epoch", f"ETA {_format_seconds(eta)}"]
    return " | ".join(parts)


def _count(model: nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def fit(model: nn.Module, train_data: Data, val_data: Data | None, config: TrainConfig, *,
        run_dir: str | Path | None = None, resume: bool = False, augment: Augment | None = None,
        loss_fn: LossFn | None = None, progress: bool = True, test_data: Data | None = None,
        on_epoch_end: Callable[[dict[str, float], nn.Module], None] | None = None) -> FitResult:
    """Train ``model`` (only parameters with ``requires_grad``) and load the best validation weights into it.

    ``train_data``/``val_data``/``test_data``: Datasets of (input, label) or tuples (inputs, labels); ``model``
    maps a batch to logits ``[B, classes]``. ``val_data=None``: no selection, the final weights are kept.
    ``augment(x, generator)`` transforms each training batch on the device, drawing randomness only from
    ``generator`` (seeded, checkpointed). ``loss_fn(logits, labels)`` -> mean loss (default cross-entropy; also
    used for the validation/test loss). ``test_data`` is evaluated once at the end, never for selection.
    ``run_dir``: folder for config.json, metrics.csv, metrics.json, best.pt (model state_dict) and last.pt (full
    state), written atomically after every epoch. ``resume=True`` continues from ``run_dir/last.pt`` when it exists
    (a finished run is not retrained: the best weights are loaded and the test set evaluated); without
    ``resume`` an existing checkpoint is an error. ``on_epoch_end(record, model)`` is called after each epoch's
    files are written. Raises ``NonFiniteLossError`` if the training loss becomes NaN/inf.

    Under torchrun (``WORLD_SIZE > 1``) ``fit`` joins the process group itself (gloo on CPU, NCCL on
    ``cuda:LOCAL_RANK``) and trains with DistributedDataParallel; ``config.batch_size`` stays the global batch, so
    the result equals a single-process run up to float rounding (see the module docstring). Only rank 0 touches
    ``run_dir`` and shows progress; every rank returns the same ``FitResult`` and ends with the same weights in
    ``model``; ``on_epoch_end`` runs on every rank once rank 0 has written the epoch's files.
    """
    distributed = dist_utils.setup(resolve_device(config.device).type)
    device = dist_utils.device_for_rank(resolve_device(config.device))
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main = rank == 0
    progress = progress and main
    precision = resolve_precision(config.precision, device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    train_set = _as_dataset(train_data, "train_data")
    val_set = _as_dataset(val_data, "val_data") if val_data is not None else None
    test_set = _as_dataset(test_data, "test_data") if test_data is not None else None
    if val_set is None and (config.early_stopping_patience is not None or config.select_initial):
        raise ValueError("early_stopping_patience and select_initial need val_data")
    run_path = Path(run_dir) if run_dir is not None else None
    last_path = run_path / "last.pt" if run_path is not None else None
    if resume and run_path is None:
        raise ValueError("resume=True needs a run_dir holding last.pt")

    def read_last() -> dict[str, Any] | None:  # rank 0 reads run_dir; the others receive its content
        if last_path is None or not last_path.exists():
            return None
        if not resume:
            raise FileExistsError(f"{last_path} exists: pass resume=True to continue (or reuse) that run, or "
                                  f"choose another run_dir")
        return _read_checkpoint(last_path)

    checkpoint = dist_utils.on_main_then_broadcast(read_last)

    seed_everything(config.seed)
    model.to(device)
    loader_generator = torch.Generator().manual_seed(config.seed + 1)
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + 2)
    loader = train_loader(train_set, config, loader_generator, device, rank=rank, world_size=world)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(loader))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    eval_bs = config.eval_batch_size or config.batch_size
    train_model: nn.Module = model
    shares: Callable[[int], tuple[int, int]] | None = None
    if distributed:  # DDP starts every rank from rank 0's weights and buffers
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        shares = loader.batch_sampler.shares  # type: ignore[union-attr]

    def validate(data: Dataset, desc: str) -> dict[str, float]:
        if distributed:
            return _sharded_eval(model, data, eval_bs, device, precision, loss_fn, config.num_workers, progress,
                                 desc)
        metrics, _, _ = _eval_pass(model, eval_loader(data, eval_bs, device, config.num_workers), device,
                                   precision, loss_fn, False, progress, desc)
        return metrics

    if checkpoint is not None:
        assert last_path is not None
        state = _load_checkpoint(last_path, config, model, optimizer, scheduler, scaler, loader_generator,
                                 augment_generator, checkpoint)
        del checkpoint
        if main:
            log.info("resuming %s after epoch %d", last_path, state.epoch)
        if progress:
            tqdm.write(f"resuming {last_path} after epoch {state.epoch}/{config.epochs}")
    else:
        state = _State()
        if config.select_initial:
            assert val_set is not None
            state.initial_val = state.best_val = validate(val_set, "initial val")
            state.best_weights = _cpu_copy(model.state_dict())
            if run_path is not None and main:
                atomic_torch_save(model.state_dict(), run_path / "best.pt")
    if run_path is not None and main:  # after a resume's config check: a refused resume leaves the folder untouched
        _write_json(run_path / "config.json", config.to_dict())

    def summary(test: dict[str, float] | None) -> dict[str, Any]:
        return {
            "label": config.label, "epochs_completed": state.epoch, "stopped_early": state.stopped_early,
            "best_epoch": state.best_epoch if val_set is not None else state.epoch, "best_val": state.best_val,
            "initial_val": state.initial_val, "test": test, "device": str(device), "precision": precision,
            "world_size": world, "global_steps": state.global_step, "steps_per_epoch": len(loader),
            "seconds_total": sum(r["seconds"] for r in state.history),
            "n_train": len(train_set),  # type: ignore[arg-type]
            "n_val": len(val_set) if val_set is not None else None,  # type: ignore[arg-type]
            "n_test": len(test_set) if test_set is not None else None,  # type: ignore[arg-type]
            "trainable_parameters": _count(model, True), "total_parameters": _count(model, False),
            "torch_version": torch.__version__, "gevit_lib_version": __version__,
        }

    started = time.perf_counter()
    epoch_seconds: list[float] = []
    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if rank > 0:
            _seed_rank_streams(config.seed, rank, epoch, augment_generator)
        train = _train_epoch(train_model, loader, optimizer, scheduler, scaler, loss_fn, augment,
                             augment_generator, device, precision, config, epoch, state, progress, shares)
        if distributed:  # BatchNorm-style buffers: every rank evaluates and keeps what rank 0 saves
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        val = validate(val_set, "val") if val_set is not None else None
        record = {"epoch": epoch, "lr": lr, **train, "val_loss": val["loss"] if val else None,
                  "val_acc": val["accuracy"] if val else None, "seconds": time.perf_counter() - t0}
        state.history.append(record)
        state.epoch = epoch
        improved = val is not None and _is_better(val, state.best_val)
        if improved:
            state.best_epoch, state.best_val, state.since_best = epoch, val, 0
            state.best_weights = _cpu_copy(model.state_dict())
        elif val is not None:
            state.since_best += 1
            if config.early_stopping_patience is not None and state.since_best >= config.early_stopping_patience:
                state.stopped_early = True
        if run_path is not None:
            if main:
                if improved or val_set is None:
                    atomic_torch_save(model.state_dict(), run_path / "best.pt")
                _save_checkpoint(run_path / "last.pt", config, model, optimizer, scheduler, scaler,
                                 loader_generator, augment_generator, state)
                _write_metrics_csv(run_path / "metrics.csv", state.history)
                _write_json(run_path / "metrics.json", summary(None))
            dist_utils.barrier()  # the epoch's files are complete before any rank goes on (or is stopped)
        epoch_seconds.append(record["seconds"])
        remaining = 0 if state.stopped_early else config.epochs - epoch
        line = _log_line(config, record, improved, remaining * sum(epoch_seconds) / len(epoch_seconds))
        if main:
            log.info(line)
        if progress:
            tqdm.write(line)
            if state.stopped_early:
                tqdm.write(f"early stopping: no validation improvement for {state.since_best} epochs")
        if on_epoch_end is not None:
            on_epoch_end(record, model)

    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    test = validate(test_set, "test") if test_set is not None else None
    if run_path is not None:
        if main:
            _write_json(run_path / "metrics.json", summary(test))
        dist_utils.barrier()
    if progress and state.best_val is not None:
        msg = (f"best epoch {state.best_epoch}: val acc {100 * state.best_val['accuracy']:.2f}% "
               f"loss {state.best_val['loss']:.4f}")
        if test is not None:
            msg += f" | test acc {100 * test['accuracy']:.2f}% loss {test['loss']:.4f} (n={test['n']})"
        tqdm.write(msg)
    return FitResult(history=state.history, best_epoch=state.best_epoch if val_set is not None else state.epoch,
                     best_val=state.best_val, initial_val=state.initial_val, test=test,
                     epochs_completed=state.epoch, stopped_early=state.stopped_early, device=str(device),
                     precision=precision, run_dir=run_path, seconds=time.perf_counter() - started)
