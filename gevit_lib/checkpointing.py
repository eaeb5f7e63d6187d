"""The state of a training run on disk: the run folder, its atomic checkpoints, RNG capture and the resume checks.

A run folder holds ``config.json``, ``metrics.csv``, ``metrics.json``, ``best.pt`` (the selected weights) and
``last.pt`` (everything needed to continue), each written through a temporary file and a rename. Resuming refuses
another model configuration, training settings outside ``RESUMABLE_CHANGES`` and fewer epochs
(docs/architecture.md, "Training").
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gevit_lib import __version__
from gevit_lib.files import atomic_torch_save, atomic_write

__all__ = ["RESUMABLE_CHANGES", "CheckpointError", "ResumeError", "UnreadableFileError", "RunState", "RunFolder",
           "load_file", "check_resume", "save_checkpoint", "restore_checkpoint", "json_record"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gevit-train/1"
CHECKPOINT_KEYS = ("format", "config", "model", "optimizer", "scheduler", "scaler", "rng", "state", "best_weights")
# Training settings that may differ between an interrupted run and its resumption (a larger ``epochs`` with a
# cosine schedule does change the remaining LR curve).
RESUMABLE_CHANGES = frozenset({"epochs", "early_stopping_patience", "device", "num_workers", "eval_batch_size",
                               "label"})
# seconds: the epoch's wall time (training and validation); train_seconds: its training steps alone
CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "train_seconds")


class CheckpointError(ValueError):
    """A checkpoint file could not be read (truncated, corrupt, or not written by ``gevit_lib.train``)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(
            f"cannot read the training checkpoint {path}: {reason}. The file is truncated, corrupt or was not "
            f"written by gevit_lib.train (format {CHECKPOINT_FORMAT!r}). The best weights so far are in "
            f"{path.parent / 'best.pt'} (a plain state dict for model.load_state_dict); to train again, use a new "
            f"run folder (another run_dir / --run-dir) or delete this one.")


class ResumeError(ValueError):
    """A run folder cannot be continued with the given model or settings (the message lists the differences)."""


class UnreadableFileError(ValueError):
    """A torch file (weights, checkpoint) that cannot be loaded safely: missing, truncated, corrupt, or unsafe."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"cannot read {path}: {reason}")


@dataclass
class RunState:
    """The loop's counters and selection state, besides the model/optimizer/scheduler/RNG states."""

    epoch: int = 0  # completed epochs
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: dict[str, float] | None = None
    best_weights: dict[str, Tensor] | None = None  # CPU copy
    initial_val: dict[str, float] | None = None
    since_best: int = 0
    stopped_early: bool = False

    def finished(self, epochs: int) -> bool:
        return self.stopped_early or self.epoch >= epochs


def json_record(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``obj`` as it reads back from JSON (tuples become lists), so that records compare equal after a round trip."""
    if obj is None:
        return None
    try:
        return json.loads(json.dumps(dict(obj)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model_config must be a JSON-serialisable mapping (names, numbers, lists): {exc}") from None


def load_file(path: str | Path) -> Any:
    """``torch.load`` of tensors and plain containers only; any failure is one UnreadableFileError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (every way a file can be unreadable ends in the same advice)
        if "weights_only" in str(exc):
            reason = "it holds objects other than tensors and plain containers"
        else:  # the first line; torch's advice to load unsafely is left out
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        raise UnreadableFileError(Path(path), reason) from None


def _flatten(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict) and obj:
        for k in sorted(obj):
            yield from _flatten(obj[k], f"{prefix}.{k}")
    else:
        yield prefix, obj


def _model_changes(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    if old is None or new is None:
        return [f"model_config: {'not recorded' if old is None else old} -> {'not recorded' if new is None else new}"]
    a, b, absent = dict(_flatten(old, "model_config")), dict(_flatten(new, "model_config")), "(absent)"
    return [f"{k}: {a.get(k, absent)!r} -> {b.get(k, absent)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, absent) != b.get(k, absent)]


def check_resume(path: Path, ckpt: dict[str, Any], config: dict[str, Any],
                 model_config: dict[str, Any] | None) -> None:
    """Refuse (ResumeError, every difference listed) to continue ``ckpt`` with another model, training settings
    outside ``RESUMABLE_CHANGES``, or fewer epochs than it has run."""
    old = ckpt["config"]
    changed = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
               if old.get(k) != config.get(k) and k not in RESUMABLE_CHANGES]
    if ckpt.get("model_config") != model_config:
        changed += _model_changes(ckpt.get("model_config"), model_config)
    if changed:
        raise ResumeError(f"cannot resume {path}: the run was made with other settings ({'; '.join(changed)}). Only "
                          f"the training settings {sorted(RESUMABLE_CHANGES)} may change on resume; use a new run "
                          f"folder for a different run.")
    done = ckpt["state"]["epoch"]
    if config["epochs"] < done:
        raise ResumeError(f"cannot resume {path} with epochs={config['epochs']}: it has already run {done} epochs. "
                          f"A run is never shortened (its files stay as they are); pass epochs >= {done}, or use a "
                          f"new run folder.")
    if ckpt.get("gevit_lib_version") not in (None, __version__):
        log.warning("%s was written by gevit_lib %s, this is %s", path, ckpt["gevit_lib_version"], __version__)


def save_checkpoint(path: Path, config: dict[str, Any], model_config: dict[str, Any] | None, state: RunState, *,
                    model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                    loader_generator: torch.Generator, augment_generator: torch.Generator) -> None:
    """Write ``last.pt`` atomically: everything :func:`restore_checkpoint` needs to continue bit-identically,
    including every random stream (python, numpy, torch CPU and CUDA, the loop's two generators)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
           "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
           "loader": loader_generator.get_state(), "augment": augment_generator.get_state()}
    counters = {k: v for k, v in vars(state).items() if k != "best_weights"}
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "config": config, "model_config": model_config,
        "gevit_lib_version": __version__, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng, "state": counters, "best_weights": state.best_weights,
    }, path)


def restore_checkpoint(path: Path, ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                       loader_generator: torch.Generator, augment_generator: torch.Generator) -> RunState:
    """Load ``ckpt`` (read from ``path``, already checked) into the run's objects; return its counters. CUDA RNG
    states are restored only on a machine with as many devices."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot resume {path}: the checkpoint does not fit this model or its trainable "
                         f"parameters ({exc})") from exc
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    loader_generator.set_state(rng["loader"])
    if augment_generator.device.type == "cpu" or len(rng["augment"]) == len(augment_generator.get_state()):
        augment_generator.set_state(rng["augment"])
    return RunState(**ckpt["state"], best_weights=ckpt["best_weights"])


class RunFolder:
    """The files of one run. Only the main process calls the writing methods."""

    def __init__(self, path: str | Path, resume: bool) -> None:
        self.path, self.resume = Path(path), resume
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"

    def read_last(self) -> dict[str, Any] | None:
        """``last.pt``'s content when resuming (any failure is a CheckpointError); None for a new run. An existing
        run without ``resume`` is an error."""
        if not self.last.exists():
            return None
        if not self.resume:
            raise FileExistsError(f"{self.last} exists: pass resume=True to continue (or reuse) that run, or "
                                  f"choose another run_dir")
        try:
            ckpt = load_file(self.last)
        except UnreadableFileError as exc:
            raise CheckpointError(self.last, exc.reason) from None
        if not isinstance(ckpt, dict):
            raise CheckpointError(self.last, f"it holds a {type(ckpt).__name__}, not a training checkpoint")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(self.last, f"its format is {ckpt.get('format')!r}")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(self.last, f"it lacks {missing}")
        return ckpt

    def write_config(self, config: dict[str, Any], model_config: dict[str, Any] | None) -> None:
        self._write_json("config.json", {"train": config, "model": model_config, "gevit_lib_version": __version__,
                                         "torch_version": torch.__version__})

    def save_best(self, model: nn.Module) -> None:
        atomic_torch_save(model.state_dict(), self.best)

    def write_history(self, history: list[dict[str, float]]) -> None:
        with atomic_write(self.path / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write_json("metrics.json", summary)

    def _write_json(self, name: str, obj: dict[str, Any]) -> None:
        with atomic_write(self.path / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=2) + "\n")
