"""GPU backend of the local lifting / group self-attention: fused Triton kernels, forward and recomputing backward.

The same function and contract as the fused CPU kernel of :mod:`.fast_attention` (``backend="kernel"``): the
logits ``[.., Gv, Gq, Gk, P*P]`` of a pixel never reach memory; the forward pass keeps only the log-normaliser of
every softmax row (exact row maximum through an online softmax), the backward pass recomputes the probabilities from
q, k, v and it; attention dropout draws its mask from a seed (a Philox counter per score) and redraws it in the
backward pass. Half-precision inputs are computed in float32 (float64 stays float64) and the output cast back.
The kernels themselves are in :mod:`._triton_kernels` (imported on first use).

Selection (:func:`selected`, used by :func:`.fast_attention.fast_local_attention`): on CUDA tensors the Triton
kernels when triton imports and a first tiny launch compiles, else the chunked torch path (one warning with the
reason). ``GEVIT_CUDA_KERNEL=chunked`` always takes the chunked path, ``=triton`` insists on Triton (an error if it
cannot run). On CPU tensors the kernels run only in triton's interpreter (``TRITON_INTERPRET=1`` set before first
use, slow: for tests) and only when asked for with ``backend="triton"``.

    from gevit_lib.nn.triton_attention import triton_local_attention, dropout_keep_mask
    out = triton_local_attention(q, k, v, pos, grp, gidx, scale=s, patch_size=5, dropout=0.1, seed=1234)
    keep = dropout_keep_mask(q, k, pos, patch_size=5, dropout=0.1, seed=1234)  # plain layout, for checks
"""

from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = ["ENV_SWITCH", "triton_local_attention", "dropout_keep_mask", "keep_scale", "available",
           "unavailable_reason", "interpreted", "selected"]

ENV_SWITCH = "GEVIT_CUDA_KERNEL"
_CHOICES = ("auto", "triton", "chunked")

# Tile sizes on GPUs: ROWS softmax rows (pixels x query elements) by COLUMNS (key element, offset) pairs per step in
# the forward / query pass; KEY_PIXELS by COLUMNS in the key pass. The interpreter takes everything in one tile
# (its cost is per operation, not per element). TILES overrides any of them (tests use it to exercise the loops).
ROWS = 16
COLUMNS = 32
KEY_PIXELS = 16
NUM_WARPS = 4
TILES: dict[str, int] = {}

_LOCK = threading.Lock()
_KERNELS: ModuleType | None = None
_ERROR: str | None = None
_PROBED: dict[str, str | None] = {}  # device -> None (works) or the reason it does not


def interpreted() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernels() -> ModuleType | None:
    global _KERNELS, _ERROR
    if _KERNELS is not None or _ERROR is not None:
        return _KERNELS
    with _LOCK:
        if _KERNELS is None and _ERROR is None:
            try:
                from . import _triton_kernels

                _KERNELS = _triton_kernels
            except Exception as err:  # noqa: BLE001 - no triton (CPU-only torch builds) or a broken install
                _ERROR = f"{type(err).__name__}: {err}"
    return _KERNELS


def available() -> bool:
    """Whether triton imports (the kernels can then run on CUDA, or on CPU in the interpreter)."""
    return _kernels() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return None if _kernels() is not None else _ERROR


def _switch() -> str:
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_SWITCH} must be one of {_CHOICES}, got {value!r}")
    return value


def _probe(device: torch.device) -> str | None:
    """Compile and run the kernels once on a tiny input of ``device``; the reason when that fails."""
    key = str(device)
    if key not in _PROBED:
        try:
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 3, 3, 2, 4, generator=gen).to(device).requires_grad_() for _ in range(3))
            pos = torch.randn(2, 9, 1, generator=gen).to(device).requires_grad_()
            grp = torch.randn(2, 2, generator=gen).to(device).requires_grad_()
            gidx = torch.zeros(2, 2, 2, dtype=torch.int64, device=device)
            triton_local_attention(q, k, v, pos, grp, gidx, scale=0.5, patch_size=3, dropout=0.5, seed=1).sum().backward()
            _PROBED[key] = None
        except Exception as err:  # noqa: BLE001 - no compiler, unsupported GPU, ...: the chunked path instead
            _PROBED[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return _PROBED[key]


def selected(backend: str, device: torch.device) -> bool:
    """Whether :func:`.fast_attention.fast_local_attention` with ``backend`` runs these kernels on ``device``."""
    if backend == "triton":
        if device.type != "cuda" and not interpreted():
            raise ValueError(f"backend 'triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); tensors "
                             f"are on {device}")
        if not available():
            raise RuntimeError(f"backend 'triton' needs triton, which does not import: {unavailable_reason()}")
        return True
    if backend != "auto" or device.type != "cuda":
        return False
    choice = _switch()
    if choice == "chunked":
        return False
    reason = unavailable_reason() if not available() else _probe(device)
    if reason is None:
        return True
    if choice == "triton":
        raise RuntimeError(f"{ENV_SWITCH}=triton, but the Triton attention kernels cannot run: {reason}")
    if not getattr(selected, "_warned", False):
        selected._warned = True  # type: ignore[attr-defined]
        warnings.warn(f"gevit_lib: the Triton attention kernels cannot run ({reason}); using the chunked torch "
                      f"path. Set {ENV_SWITCH}=chunked to silence this.", RuntimeWarning, stacklevel=3)
    return False


def keep_scale(dropout: float) -> float:
    """Factor of the kept scores: 1 / (1 - p) (0 when everything is dropped)."""
    return 1.0 / (1.0 - dropout) if dropout < 1.0 else 0.0


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _meta(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, patch: int,
          dropout: float) -> dict[str, Any]:
    """Shapes and tile sizes (constexpr arguments of the kernels); BX pixels x BG query elements = rows of a tile."""
    n_pix, gq, d = q.shape[0] * q.shape[1] * q.shape[2], q.shape[3], q.shape[4]
    gk, gv, p2 = k.shape[3], pos.shape[0], patch * patch
    bg = _pow2(gq)
    if interpreted() and not q.is_cuda:
        tiles = dict(BX=min(_pow2(n_pix), max(1, 512 // bg)), BR=min(_pow2(gk * p2), 256), KX=min(_pow2(n_pix), 64),
                     BS=min(_pow2(gv * gq * p2), 1024))
    else:
        tiles = dict(BX=max(1, ROWS // bg), BR=COLUMNS, KX=KEY_PIXELS, BS=COLUMNS)
    tiles.update(TILES)
    return dict(GQ=gq, GK=gk, GV=gv, D=d, DV=v.shape[4], DPOS=pos.shape[2], DG=grp.shape[1] if grp is not None else 1,
                P=patch, BG=bg, BD=_pow2(d), BDV=_pow2(v.shape[4]), HAS_GROUP=grp is not None, DROPOUT=dropout > 0,
                **tiles)


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _Null()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _group_args(q: Tensor, grp: Tensor | None, gidx: Tensor | None) -> tuple[Tensor, Tensor]:
    if grp is None:
        return q, torch.zeros(1, dtype=torch.int32, device=q.device)  # placeholders, never read
    return grp, gidx.to(device=q.device, dtype=torch.int32).contiguous()  # type: ignore[union-attr]


def _forward(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None, scale: float,
             patch: int, dropout: float, seed: int) -> tuple[Tensor, Tensor]:
    kern = _kernels()
    assert kern is not None
    n, h, w, gq = q.shape[:4]
    gv, dv = pos.shape[0], v.shape[4]
    out = q.new_empty(n, h, w, gv, dv)
    lse = q.new_empty(n, h, w, gv, gq)
    n_pix = n * h * w
    if n_pix == 0:
        return out, lse
    g_arg, i_arg = _group_args(q, grp, gidx)
    meta = _meta(q, k, v, pos, grp, patch, dropout)
    grid = (_cdiv(n_pix, meta["BX"]), gv)
    with _device_guard(q):
        kern._fwd[grid](q, k, v, pos, g_arg, i_arg, out, lse, n_pix, h, w, float(scale), float(dropout),
                        keep_scale(dropout), int(seed), num_warps=NUM_WARPS, **_pick(meta, _QUERY_TILES))
    return out, lse


def _backward(go: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None,
              lse: Tensor, scale: float, patch: int, dropout: float,
              seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    kern = _kernels()
    assert kern is not None
    n, h, w = q.shape[:3]
    gk = k.shape[3]
    n_pix = n * h * w
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n_pix == 0:
        return dq, dk, dv, torch.zeros_like(pos), (torch.zeros_like(grp) if grp is not None else None)
    g_arg, i_arg = _group_args(q, grp, gidx)
    meta = _meta(q, k, v, pos, grp, patch, dropout)
    n_blocks = _cdiv(n_pix, meta["BX"])
    # the query pass loops over pixel blocks: a bounded number of programs, each with its own partial table sums
    programs = min(n_blocks, 4 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2)
    delta = torch.empty_like(lse)
    dpos_part = q.new_zeros(programs, *pos.shape)
    j, dg = (grp.shape[0], grp.shape[1]) if grp is not None else (1, 1)
    dgrp_part = q.new_zeros(programs, j, dg)
    common = (float(scale), float(dropout), keep_scale(dropout), int(seed))
    with _device_guard(q):
        kern._bwd_query[(programs,)](q, k, v, pos, g_arg, i_arg, lse, go, dq, delta, dpos_part, dgrp_part, n_pix,
                                     n_blocks, h, w, *common, J=j, num_warps=NUM_WARPS, **_pick(meta, _QUERY_TILES))
        kern._bwd_key[(_cdiv(n_pix, meta["KX"]), gk)](q, k, v, pos, g_arg, i_arg, lse, go, delta, dk, dv, n_pix, h,
                                                      w, *common, num_warps=NUM_WARPS, BX=meta["KX"],
                                                      **_pick(meta, ("BS",)))
    return dq, dk, dv, dpos_part.sum(0), (dgrp_part.sum(0) if grp is not None else None)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SHAPES = ("GQ", "GK", "GV", "D", "DV", "DPOS", "DG", "P", "BD", "BDV", "HAS_GROUP", "DROPOUT")
_QUERY_TILES = ("BX", "BG", "BR")


def _pick(meta: dict[str, Any], tiles: tuple[str, ...]) -> dict[str, Any]:
    return {key: meta[key] for key in _SHAPES + tiles}


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None,
                scale: float, patch: int, dropout: float, seed: int) -> Tensor:
        out, lse = _forward(q, k, v, pos, grp, gidx, scale, patch, dropout, seed)
        ctx.save_for_backward(q, k, v, pos, grp, gidx, lse)
        ctx.config = (scale, patch, dropout, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, pos, grp, gidx, lse = ctx.saved_tensors
        grads = _backward(grad_out.to(q.dtype).contiguous(), q, k, v, pos, grp, gidx, lse, *ctx.config)
        return (*grads, None, None, None, None, None)


def _check(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None,
           patch_size: int) -> None:
    if patch_size % 2 != 1:
        raise ValueError(f"patch_size must be odd, got {patch_size}")
    if pos.shape[1] != patch_size * patch_size:
        raise ValueError(f"positional table has {pos.shape[1]} offsets, patch {patch_size} needs {patch_size ** 2}")
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(f"the Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {q.device}")
    if (grp is None) != (gidx is None):
        raise ValueError("give both grp and gidx (group layer) or neither (lifting layer)")
    extra = grp.shape[1] if grp is not None else 0
    if pos.shape[2] + extra > q.shape[4]:
        raise ValueError(f"positional ({pos.shape[2]}) + group ({extra}) channels exceed the {q.shape[4]} query "
                         "channels")


def triton_local_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None, *,
                           scale: float, patch_size: int, dropout: float = 0.0, seed: int = 0) -> Tensor:
    """Local lifting/group self-attention with the Triton kernels (layouts of :func:`.fast_local_attention`).

    q ``[N, H, W, Gq, d]``, k ``[N, H, W, Gk, d]``, v ``[N, H, W, Gk, dv]``, pos ``[Gv, P*P, dpos]``, grp ``[J, dg]``
    and gidx ``[Gv, Gq, Gk]`` (None, None: lifting); returns ``[N, H, W, Gv, dv]`` in q's dtype. ``dropout`` > 0
    drops probabilities with the mask of ``seed`` (see :func:`dropout_keep_mask`) and scales the kept ones by
    :func:`keep_scale`.
    """
    _check(q, k, v, pos, grp, gidx, patch_size)
    if not available():
        raise RuntimeError(f"triton does not import: {unavailable_reason()}")
    dtype = q.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    args = [t.to(work).contiguous() if t is not None else None for t in (q, k, v, pos, grp)]
    with torch.autocast(q.device.type, enabled=False):
        out = _TritonAttention.apply(*args, gidx, float(scale), int(patch_size), float(dropout), int(seed))
    return out.to(dtype)


def dropout_keep_mask(q: Tensor, k: Tensor, pos: Tensor, *, patch_size: int, dropout: float, seed: int) -> Tensor:
    """The kernels' dropout mask for these shapes and ``seed`` (True = kept), in the plain path's layout
    ``[N, Gv, Gq, H, W, Gk, P, P]`` (see :func:`gevit_lib.nn.attention.local_attention` with ``impl="plain"``).

    For checks: the plain path with this mask (times :func:`keep_scale`) instead of ``F.dropout`` computes what the
    kernels compute. Offsets outside the image are reported too (their probability is 0 anyway).
    """
    kern = _kernels()
    if kern is None:
        raise RuntimeError(f"triton does not import: {unavailable_reason()}")
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(f"the Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {q.device}")
    n, h, w, gq = q.shape[:4]
    gk, gv, p2 = k.shape[3], pos.shape[0], patch_size * patch_size
    mask = torch.empty(n, h, w, gv, gq, gk, p2, dtype=torch.int8, device=q.device)
    total, block = mask.numel(), 1024
    if total:
        with _device_guard(q):
            kern.keep_mask_kernel[(_cdiv(total, block),)](mask, total, int(seed), float(dropout), GV=gv, GQ=gq,
                                                                GK=gk, P2=p2, BLOCK=block)
    mask = mask.view(n, h, w, gv, gq, gk, patch_size, patch_size).permute(0, 3, 4, 1, 2, 5, 6, 7)
    return mask.bool()
