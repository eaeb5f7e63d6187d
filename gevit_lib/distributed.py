"""Multi-process (torchrun) helpers for ``gevit_lib.train``: process-group setup, rank queries, reductions,
"rank 0 does it, everyone gets the result", and the sampler that gives each process its part of the
single-process batches. Outside torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every function is a cheap no-op.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import BatchSampler, RandomSampler, Sampler

__all__ = ["is_distributed", "rank", "local_rank", "world_size", "is_main_process", "setup", "device_for_rank",
           "barrier", "all_reduce_sum", "on_main_then_broadcast", "shard_bounds", "ShardedBatchSampler"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Index of this process on its node (``LOCAL_RANK``; 0 outside torchrun)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return rank() % max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 0


def is_main_process() -> bool:
    return rank() == 0


def setup(device_type: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment, if any; return whether this run is distributed.
    NCCL on ``cuda`` (device ``cuda:LOCAL_RANK``), gloo on CPU; an existing group is reused, a new one is destroyed
    at exit."""
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        if device_type == "cpu" and "gloo" not in backend:
            raise RuntimeError(f"the process group uses backend {backend!r}, which cannot reduce CPU tensors; "
                               f"train on device='cuda' or initialise the group with backend 'gloo'")
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())
        return is_distributed()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for distributed training, but this torch build has no "
                           f"torch.distributed")
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} is set but {missing} are not; launch with torchrun "
                           f"(python -m torch.distributed.run --nproc-per-node N script.py)")
    if device_type == "cuda":
        if torch.cuda.device_count() <= local_rank():
            raise RuntimeError(f"LOCAL_RANK={local_rank()} but only {torch.cuda.device_count()} CUDA devices are "
                               f"visible; start at most that many processes per node")
        torch.cuda.set_device(local_rank())
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return is_distributed()


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun a CUDA device means this process's GPU, ``cuda:LOCAL_RANK``; other devices are unchanged."""
    if device.type != "cuda" or not is_distributed():
        return device
    dev = torch.device("cuda", local_rank())
    if device.index is not None and device.index != dev.index:
        log.warning("device %s ignored under torchrun: rank %d uses %s (LOCAL_RANK)", device, rank(), dev)
    return dev


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes, in place (returned for chaining); unchanged in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def on_main_then_broadcast(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result (picklable) on every rank. An exception raised by ``fn`` is
    re-raised on every rank, so the others do not wait for a collective that rank 0 never joins."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    error: Exception | None = None
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 (forwarded to every rank and re-raised)
            error = exc
            try:  # sent as it is when it survives pickling, else as a RuntimeError with its type and message
                pickle.loads(pickle.dumps(exc))
                box[0] = ("error", exc)
            except Exception:  # noqa: BLE001
                box[0] = ("error", RuntimeError(f"rank 0 failed with {type(exc).__name__}: {exc}"))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if error is not None:
        raise error
    if status == "error":
        raise value
    return value


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and end of rank ``rank``'s contiguous part of ``count`` items split as evenly as possible (the first
    ``count % world_size`` ranks get one more)."""
    base, extra = divmod(count, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class ShardedBatchSampler(Sampler[list[int]]):
    """This process's part of every batch of ``DataLoader(shuffle=True, batch_size, generator)``.

    Every rank holds an identically seeded generator and draws the same batches; rank r takes
    ``shard_bounds(len(batch), r, N)`` of each. When that part is empty (a last batch smaller than N) it gets the
    batch's first sample, which the training loop weights by 0 (``shares`` gives the true counts).
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
