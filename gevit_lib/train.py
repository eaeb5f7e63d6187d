"""Training and evaluation loop shared by every experiment: ``fit`` and ``evaluate``.

Seeded and deterministic on CPU, per-batch LR schedules, mixed precision on CUDA, best-on-validation selection (the
test set is evaluated once at the end), an atomically written run folder that resumes bit-identically, and a
``NonFiniteLossError`` instead of skipped batches. Under torchrun the same ``fit`` trains with DDP and computes the
single-process optimizer steps; docs/architecture.md ("Training") explains how.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from gevit_lib import __version__
from gevit_lib import distributed as dist_utils
from gevit_lib.augment import Augment
from gevit_lib.checkpointing import RunFolder, RunState, check_resume, json_record, restore_checkpoint, save_checkpoint
from gevit_lib.distributed import ShardedBatchSampler, shard_bounds

__all__ = ["TrainConfig", "FitResult", "NonFiniteLossError", "fit", "evaluate", "build_optimizer", "build_scheduler",
           "lr_factor", "seed_everything", "resolve_device", "resolve_precision", "autocast", "train_loader"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "multistep")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# A dataset of (input, label) pairs, or a pair of tensors (inputs, labels).
Data = Union[Dataset, tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]


class NonFiniteLossError(FloatingPointError):
    """The training or validation loss became NaN or infinite; the run stops instead of skipping the batch.
    ``step`` is None for a validation loss; ``epoch`` 0 is the initial model's validation (``select_initial``)."""

    def __init__(self, value: float, epoch: int, step: int | None, global_step: int, label: str = "",
                 split: str = "training") -> None:
        self.value, self.epoch, self.step, self.global_step, self.split = value, epoch, step, global_step, split
        if step is not None:
            when, before = f"at epoch {epoch}, step {step} (global step {global_step})", "step changed the weights"
        else:
            when = f"after epoch {epoch}" if epoch else "of the initial model"
            before = "epoch's files were written"
        where = f" in run {label!r}" if label else ""
        super().__init__(
            f"{split} loss is {value} {when}{where}. The run was stopped before this {before}; the checkpoint of the "
            f"previous epoch is intact. Check the {split} data for NaN/inf, lower the learning rate, set grad_clip, "
            f"or use precision='bf16'/'fp32' instead of 'fp16'.")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (written to ``config.json``).

    ``milestones``: 0-based epoch indices as in ``MultiStepLR``. ``warmup_epochs`` may be fractional.
    ``select_initial``: the model before training is the starting best (the post's finetuning); if no epoch beats
    it, the initial weights are restored.
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
        m, patience, clip = self.milestones, self.early_stopping_patience, self.grad_clip
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose one of {PRECISIONS}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "nesterov=True needs optimizer='sgd' and momentum > 0"),
            (0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must lie in [0, epochs={self.epochs}], got {self.warmup_epochs}"),
            (list(m) == sorted(set(m)) and all(i >= 0 for i in m),
             f"milestones must be increasing non-negative epoch indices, got {m}"),
            (patience is None or patience >= 1, f"early_stopping_patience must be >= 1 or None, got {patience}"),
            (clip is None or clip > 0, f"grad_clip must be > 0 or None, got {clip}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "milestones": list(self.milestones)}


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


def _as_dataset(data: Data, what: str) -> Dataset:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"{what}: {len(data[0])} inputs but {len(data[1])} labels")
        data = TensorDataset(*data)
    elif not isinstance(data, Dataset):
        raise TypeError(f"{what} must be a torch Dataset of (input, label) pairs or a tuple (inputs, labels), "
                        f"got {type(data).__name__}")
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{what} is empty")
    return data


def _seed_worker(worker_id: int, rank: int = 0) -> None:
    """Seed numpy and ``random`` in a loader worker from its torch seed; ranks > 0 first derive their own torch
    seed from (seed, rank), so per-item random transforms differ between ranks."""
    seed = torch.initial_seed()
    if rank > 0:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
        torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed % 2**32)


def train_loader(dataset: Dataset, config: TrainConfig, generator: torch.Generator, device: torch.device, *,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled training batches drawn from ``generator``; with ``world_size > 1`` this rank's part of them."""
    common = dict(generator=generator, num_workers=config.num_workers,
                  worker_init_fn=functools.partial(_seed_worker, rank=rank), pin_memory=device.type == "cuda")
    if world_size == 1:
        return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, **common)  # type: ignore[arg-type]
    sampler = ShardedBatchSampler(len(dataset), config.batch_size, generator, rank, world_size)  # type: ignore
    return DataLoader(dataset, batch_sampler=sampler, **common)  # type: ignore[arg-type]


def build_optimizer(params: nn.Module | Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters with ``requires_grad=True`` (frozen ones are left out)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter has requires_grad=False")
    # foreach: torch's default on CUDA; on the CPU the same arithmetic as its per-parameter loop (bit-identical, tested)
    # with one call per operation for all parameters instead of one per parameter
    common = dict(lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(trainable, **common)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(trainable, **common)
    return torch.optim.SGD(trainable, momentum=config.momentum, nesterov=config.nesterov, **common)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` for the 0-based optimizer ``step``. multistep: ``gamma ** (milestones <= epoch
    index)``; warmup_cosine: linear warm-up reaching 1 at the last warm-up step, then a half cosine that would reach
    0 one step after the last step."""
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "multistep":
        epoch = step // steps_per_epoch
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.epochs * steps_per_epoch - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Per-batch ``LambdaLR`` following ``lr_factor`` (call ``.step()`` after every optimizer step)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, config, steps_per_epoch))


@torch.no_grad()
def _eval_pass(model: nn.Module, data: Dataset, batch_size: int, device: torch.device, precision: str,
               loss_fn: LossFn, *, num_workers: int = 0, progress: bool = False, desc: str = "eval",
               sharded: bool = False) -> dict[str, float]:
    """Metrics over ``data`` in dataset order. ``sharded``: each process evaluates a contiguous block of the batches
    and the per-batch loss sums are added in batch order after the reduction, so the result is bit-identical to one
    process going through all batches. A private generator keeps the global torch RNG untouched."""
    size = len(data)  # type: ignore[arg-type]
    total = math.ceil(size / batch_size)
    lo, hi = shard_bounds(total, dist_utils.rank(), dist_utils.world_size()) if sharded else (0, total)
    batches = [list(range(j * batch_size, min(size, (j + 1) * batch_size))) for j in range(lo, hi)]
    loader = DataLoader(data, batch_sampler=batches, num_workers=num_workers, worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    batch_sums = torch.zeros(total, dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    try:
        for j, (x, y) in enumerate(tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True),
                                   start=lo):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float()
            batch_sums[j] = loss_fn(logits, y).double() * len(y)
            correct += (logits.argmax(dim=-1) == y).sum()
            n += len(y)
    finally:
        model.train(was_training)
    if sharded:  # each slot has exactly one non-zero contributor, so the sum over ranks is exact
        dist_utils.all_reduce_sum(batch_sums)
        counts = dist_utils.all_reduce_sum(torch.stack([correct, torch.tensor(n, device=device)]))
        correct, n = counts[0], int(counts[1].item())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for value in batch_sums:
        loss_sum += value
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "n": n}


def evaluate(model: nn.Module, data: Data, *, batch_size: int = 256, device: str = "cpu", precision: str = "fp32",
             progress: bool = False, loss_fn: LossFn | None = None, num_workers: int = 0) -> dict[str, float]:
    """Mean loss (cross-entropy unless ``loss_fn``), accuracy (fraction) and count on ``data``, in eval mode.
    Moves ``model`` to ``device`` and restores its train/eval mode; does not consume the global RNG."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    return _eval_pass(model, _as_dataset(data, "data"), batch_size, dev, prec, loss_fn or nn.CrossEntropyLoss(),
                      num_workers=num_workers, progress=progress)


class _Splits(NamedTuple):
    train: Dataset
    val: Dataset | None
    test: Dataset | None


@dataclass
class _Loop:
    """What one call of ``fit`` trains with (built by :func:`_prepare`)."""

    model: nn.Module  # the caller's model: evaluated, saved, returned
    train_model: nn.Module  # the same model, wrapped in DistributedDataParallel under torchrun
    config: TrainConfig
    device: torch.device
    precision: str
    loss_fn: LossFn
    augment: Augment | None
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler | None
    loader_generator: torch.Generator
    augment_generator: torch.Generator
    progress: bool
    distributed: bool


def _splits(train_data: Data, val_data: Data | None, test_data: Data | None, config: TrainConfig) -> _Splits:
    splits = _Splits(_as_dataset(train_data, "train_data"),
                     _as_dataset(val_data, "val_data") if val_data is not None else None,
                     _as_dataset(test_data, "test_data") if test_data is not None else None)
    if splits.val is None and (config.early_stopping_patience is not None or config.select_initial):
        raise ValueError("early_stopping_patience and select_initial need val_data")
    return splits


def _prepare(model: nn.Module, train_set: Dataset, config: TrainConfig, augment: Augment | None,
             loss_fn: LossFn | None, progress: bool, distributed: bool) -> _Loop:
    """Seed, move the model, build loader / optimizer / schedule / scaler (in this order: it fixes the RNG draws)."""
    device = dist_utils.device_for_rank(resolve_device(config.device))
    seed_everything(config.seed)
    model.to(device)
    loader_generator = torch.Generator().manual_seed(config.seed + 1)
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + 2)
    loader = train_loader(train_set, config, loader_generator, device, rank=dist_utils.rank(),
                          world_size=dist_utils.world_size())
    optimizer = build_optimizer(model, config)
    precision = resolve_precision(config.precision, device)
    train_model = model
    if distributed:  # DDP starts every rank from rank 0's weights and buffers
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Loop(model=model, train_model=train_model, config=config, device=device, precision=precision,
                 loss_fn=loss_fn or nn.CrossEntropyLoss(), augment=augment, loader=loader, optimizer=optimizer,
                 scheduler=build_scheduler(optimizer, config, len(loader)),
                 scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
                 loader_generator=loader_generator, augment_generator=augment_generator,
                 progress=progress and dist_utils.is_main_process(), distributed=distributed)


def _validate(loop: _Loop, data: Dataset, desc: str, epoch: int | None = None, global_step: int = 0
              ) -> dict[str, float]:
    """Metrics on ``data`` (split over the processes under torchrun). With ``epoch`` (a selection pass) a
    non-finite loss stops the run."""
    config = loop.config
    metrics = _eval_pass(loop.model, data, config.eval_batch_size or config.batch_size, loop.device, loop.precision,
                         loop.loss_fn, num_workers=config.num_workers, progress=loop.progress, desc=desc,
                         sharded=loop.distributed)
    if epoch is not None and not math.isfinite(metrics["loss"]):
        raise NonFiniteLossError(metrics["loss"], epoch, None, global_step, config.label, split="validation")
    return metrics


def _cpu_copy(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _select(state: RunState, record: dict[str, Any], val: dict[str, float] | None, model: nn.Module,
            patience: int | None) -> bool:
    """Add the epoch's record; keep the weights if they are the best so far; decide early stopping."""
    state.history.append(record)
    state.epoch = record["epoch"]
    if val is None:
        return False
    best, acc = state.best_val, val["accuracy"]  # higher accuracy wins; equal accuracy: lower loss
    if best is None or acc > best["accuracy"] or (acc == best["accuracy"] and val["loss"] < best["loss"]):
        state.best_epoch, state.best_val, state.since_best = state.epoch, val, 0
        state.best_weights = _cpu_copy(model.state_dict())
        return True
    state.since_best += 1
    state.stopped_early = patience is not None and state.since_best >= patience
    return False


def _train_epoch(loop: _Loop, epoch: int, state: RunState) -> dict[str, float]:
    """One epoch of optimizer steps; returns the training loss and accuracy (reduced over the processes)."""
    config, device = loop.config, loop.device
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if rank > 0:  # per-rank dropout and augmentation, reproducible after a resume without per-rank state
        rank_seed = int(np.random.SeedSequence([config.seed, rank, epoch]).generate_state(1)[0])
        seed_everything(rank_seed)
        loop.augment_generator.manual_seed(rank_seed + 2)
    # (this rank's samples, global batch size) of a step; None in a single process
    shares = loop.loader.batch_sampler.shares if loop.distributed else None  # type: ignore[union-attr]
    loop.train_model.train()
    params = [p for group in loop.optimizer.param_groups for p in group["params"]]
    loss_sum, n = 0.0, 0
    correct = torch.zeros((), dtype=torch.long, device=device)
    bar = tqdm(loop.loader, desc=f"{config.label + ' ' if config.label else ''}epoch {epoch}/{config.epochs}",
               leave=False, disable=not loop.progress, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if loop.augment is not None:
            x = loop.augment(x, loop.augment_generator)
        with autocast(device, loop.precision):
            logits = loop.train_model(x)
        loss = loop.loss_fn(logits.float(), y)
        if shares is None:
            loss_value = loss.item()
            count, step_sum = len(y), loss_value * len(y)
        else:  # weight count * world / total: DDP's gradient average becomes the mean over the global batch
            count, total = shares(step - 1)
            step_sum = dist_utils.all_reduce_sum(loss.detach().double() * count).item()  # sum of loss * n
            loss_value = step_sum / total
            if count * world != total:
                loss = loss * (count * world / total)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(loss_value, epoch, step, state.global_step + 1, config.label)
        _step(loop, loss, params)
        state.global_step += 1
        loss_sum += step_sum
        if count:  # a rank's stand-in sample (count 0) is not counted
            correct += (logits.detach().argmax(dim=-1) == y).sum()
        n += count
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    if shares is not None:
        counts = dist_utils.all_reduce_sum(torch.stack([correct, torch.tensor(n, device=device)]))
        correct, n = counts[0], int(counts[1].item())
        for buffer in loop.model.buffers():  # BatchNorm-style buffers: every rank keeps what rank 0 saves
            torch.distributed.broadcast(buffer, src=0)
    return {"train_loss": loss_sum / n, "train_acc": correct.item() / n}


def _step(loop: _Loop, loss: Tensor, params: list[nn.Parameter]) -> None:
    """Backward, optional gradient clipping (after unscaling fp16 gradients), optimizer and schedule step."""
    optimizer, scaler, clip = loop.optimizer, loop.scaler, loop.config.grad_clip
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    loop.scheduler.step()


def _summary(loop: _Loop, state: RunState, splits: _Splits, test: dict[str, float] | None) -> dict[str, Any]:
    """What ``metrics.json`` holds."""
    n = [len(s) if s is not None else None for s in splits]  # type: ignore[arg-type]
    params = list(loop.model.parameters())
    return {
        "label": loop.config.label, "epochs_completed": state.epoch, "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch if splits.val is not None else state.epoch, "best_val": state.best_val,
        "initial_val": state.initial_val, "test": test, "device": str(loop.device), "precision": loop.precision,
        "world_size": dist_utils.world_size(), "global_steps": state.global_step,
        "steps_per_epoch": len(loop.loader), "seconds_total": sum(r["seconds"] for r in state.history),
        "n_train": n[0], "n_val": n[1], "n_test": n[2],
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "total_parameters": sum(p.numel() for p in params),
        "torch_version": torch.__version__, "gevit_lib_version": __version__,
    }


def _report(loop: _Loop, line: str) -> None:
    """A line in the log (rank 0) and on screen (``progress``)."""
    if dist_utils.is_main_process():
        log.info(line)
    if loop.progress:
        tqdm.write(line)


def _report_epoch(loop: _Loop, state: RunState, record: dict[str, Any], improved: bool,
                  epoch_seconds: list[float]) -> None:
    """The epoch's line, with an ETA from the epochs of this call."""
    config = loop.config
    epoch_seconds.append(record["seconds"])
    remaining = 0 if state.stopped_early else config.epochs - record["epoch"]
    eta = int(round(remaining * sum(epoch_seconds) / len(epoch_seconds)))
    h, m, s = eta // 3600, eta // 60 % 60, eta % 60
    eta_text = f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
    parts = [f"{config.label + ' ' if config.label else ''}epoch {record['epoch']}/{config.epochs}",
             f"lr {record['lr']:.2e}",
             f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}%"]
    if record["val_loss"] is not None:
        parts.append(f"val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}%{' *' if improved else ''}")
    parts += [f"{record['seconds']:.1f} s/epoch", f"ETA {eta_text}"]
    _report(loop, " | ".join(parts))
    if loop.progress and state.stopped_early:
        tqdm.write(f"early stopping: no validation improvement for {state.since_best} epochs")


def fit(model: nn.Module, train_data: Data, val_data: Data | None, config: TrainConfig, *,
        run_dir: str | Path | None = None, resume: bool = False, augment: Augment | None = None,
        loss_fn: LossFn | None = None, progress: bool = True, test_data: Data | None = None,
        on_epoch_end: Callable[[dict[str, float], nn.Module], None] | None = None,
        model_config: Mapping[str, Any] | None = None) -> FitResult:
    """Train ``model`` (only parameters with ``requires_grad``) and load the best validation weights into it.

    Data: Datasets of (input, label) or tuples (inputs, labels); ``val_data=None`` keeps the final weights;
    ``test_data`` is evaluated once at the end. ``augment(x, generator)`` transforms each training batch on the
    device. ``loss_fn(logits, labels)`` -> mean loss (default cross-entropy). ``run_dir`` receives the run folder
    (:mod:`gevit_lib.checkpointing`) every epoch, recording ``model_config`` (JSON-serialisable). ``resume=True``
    continues from ``run_dir/last.pt``, refusing another ``model_config``, other settings or fewer epochs; a
    finished run is not retrained or rewritten. ``on_epoch_end(record, model)`` runs after each epoch's files.
    Under torchrun only rank 0 touches ``run_dir``; every rank returns the same result and weights.
    """
    distributed = dist_utils.setup(resolve_device(config.device).type)
    main = dist_utils.is_main_process()
    splits = _splits(train_data, val_data, test_data, config)
    model_record = json_record(model_config)
    if resume and run_dir is None:
        raise ValueError("resume=True needs a run_dir holding last.pt")
    run = RunFolder(run_dir, resume) if run_dir is not None else None
    checkpoint = dist_utils.on_main_then_broadcast(run.read_last) if run is not None else None
    loop = _prepare(model, splits.train, config, augment, loss_fn, progress, distributed)
    stateful = dict(model=model, optimizer=loop.optimizer, scheduler=loop.scheduler, scaler=loop.scaler,
                    loader_generator=loop.loader_generator, augment_generator=loop.augment_generator)

    state, finished = RunState(), False
    if run is not None and checkpoint is not None:
        check_resume(run.last, checkpoint, config.to_dict(), model_record)
        state = restore_checkpoint(run.last, checkpoint, **stateful)
        del checkpoint
        finished = state.finished(config.epochs)
        note = "already finished: nothing to train, its files stay as they are" if finished else "resuming"
        _report(loop, f"{run.last}: {note} (epoch {state.epoch}/{config.epochs})")
    elif config.select_initial:
        assert splits.val is not None
        state.initial_val = state.best_val = _validate(loop, splits.val, "initial val", epoch=0)
        state.best_weights = _cpu_copy(model.state_dict())
        if run is not None and main:
            run.save_best(model)
    if run is not None and main and not finished:  # after the resume checks: a refused resume changes nothing
        run.write_config(config.to_dict(), model_record)

    started, epoch_seconds = time.perf_counter(), []
    while not state.finished(config.epochs):
        epoch, t0, lr = state.epoch + 1, time.perf_counter(), loop.optimizer.param_groups[0]["lr"]
        train = _train_epoch(loop, epoch, state)
        train_seconds = time.perf_counter() - t0  # the optimizer steps alone, without the validation pass
        val = _validate(loop, splits.val, "val", epoch, state.global_step) if splits.val is not None else None
        record = {"epoch": epoch, "lr": lr, **train, "val_loss": val["loss"] if val else None,
                  "val_acc": val["accuracy"] if val else None, "seconds": time.perf_counter() - t0,
                  "train_seconds": train_seconds}
        improved = _select(state, record, val, model, config.early_stopping_patience)
        if run is not None:
            if main:
                if improved or val is None:
                    run.save_best(model)
                run.write_history(state.history)
                run.write_summary(_summary(loop, state, splits, None))
                # last: a run killed at any point has every file of the epoch its last.pt holds
                save_checkpoint(run.last, config.to_dict(), model_record, state, **stateful)
            dist_utils.barrier()  # the epoch's files are complete before any rank goes on (or is stopped)
        _report_epoch(loop, state, record, improved, epoch_seconds)
        if on_epoch_end is not None:
            on_epoch_end(record, model)

    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    test = _validate(loop, splits.test, "test") if splits.test is not None else None
    if run is not None and not finished:
        if main:
            run.write_summary(_summary(loop, state, splits, test))
        dist_utils.barrier()
    if loop.progress and state.best_val is not None:
        best = state.best_val
        msg = f"best epoch {state.best_epoch}: val acc {100 * best['accuracy']:.2f}% loss {best['loss']:.4f}"
        if test is not None:
            msg += f" | test acc {100 * test['accuracy']:.2f}% loss {test['loss']:.4f} (n={test['n']})"
        tqdm.write(msg)
    return FitResult(history=state.history, best_epoch=state.best_epoch if splits.val is not None else state.epoch,
                     best_val=state.best_val, initial_val=state.initial_val, test=test,
                     epochs_completed=state.epoch, stopped_early=state.stopped_early, device=str(loop.device),
                     precision=loop.precision, run_dir=run.path if run is not None else None,
                     seconds=time.perf_counter() - started)
