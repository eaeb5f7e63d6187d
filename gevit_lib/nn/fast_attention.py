"""Fast path of GE-ViT / GSA-Net local attention: memory-light autograd Functions (flash-attention style).

Same function as :func:`gevit_lib.nn.attention.reference_attention` without its full logit tensor: on CPU by default
the fused C++ kernel (:mod:`gevit_lib.nn.cpu_kernel`), on CUDA the Triton kernels, else the chunked torch code below.
The three logit terms (content, spatial, group) are exponentiated at their own sizes, each shifted by its own
maximum, and multiplied into score blocks chunk by chunk (exact fallback when that bound underflows); the backward
pass recomputes the blocks from the saved log-sum-exp and maxima; dropout masks are redrawn from (seed, chunk).
docs/architecture.md has the details. Layouts: q ``[N, H, W, Gq, d]``, k ``[N, H, W, Gk, d]``, v
``[N, H, W, Gk, dv]``, pos ``[Gv, P*P, dpos]``, grp ``[J, dg]``, gidx ``[Gv, Gq, Gk]``; out ``[N, H, W, Gv, dv]``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernel, triton_attention

__all__ = ["fast_local_attention", "packed_local_attention", "default_chunk_elements", "BACKENDS"]


def default_chunk_elements(device: torch.device) -> int:
    """Score elements per chunk: ~4 MiB of float32 on CPU (cache-sized), far more on GPUs."""
    return 1 << 20 if device.type == "cpu" else 1 << 26


def _chunks(n_img: int, height: int, row_cost: int, budget: int) -> Iterator[tuple[int, int, int, int]]:
    """(image start, image stop, row start, row stop) blocks of about ``budget`` score elements."""
    rows = max(1, budget // max(1, row_cost))
    if rows >= height:
        step = max(1, rows // height)
        for b0 in range(0, n_img, step):
            yield b0, min(n_img, b0 + step), 0, height
    else:
        for b0 in range(n_img):
            for i0 in range(0, height, rows):
                yield b0, b0 + 1, i0, min(height, i0 + rows)


def _border_bias(height: int, width: int, patch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """0 inside the image, -inf outside: ``[H, W, P*P]``."""
    r = patch // 2
    i = torch.arange(height, device=device).view(-1, 1, 1, 1) + torch.arange(patch, device=device).view(1, 1, -1, 1) - r
    j = torch.arange(width, device=device).view(1, -1, 1, 1) + torch.arange(patch, device=device).view(1, 1, 1, -1) - r
    inside = (i >= 0) & (i < height) & (j >= 0) & (j < width)
    return torch.zeros(inside.shape, dtype=dtype, device=device).masked_fill_(~inside, float("-inf")).flatten(2)


def _neighbours(padded: Tensor, b0: int, b1: int, i0: int, i1: int, patch: int) -> Tensor:
    """Neighbourhoods of rows i0:i1 of images b0:b1 from a zero-padded ``[N, H+2r, W+2r, G, c]``: ``[n, P*P*G, c]``."""
    win = padded[b0:b1, i0:i1 + patch - 1].unfold(1, patch, 1).unfold(2, patch, 1)  # [nb, nr, W, G, c, P, P]
    nb, nr, w, g, c = win.shape[:5]
    return win.permute(0, 1, 2, 5, 6, 3, 4).reshape(nb * nr * w, patch * patch * g, c)


def _fold_add(padded_grad: Tensor, grad: Tensor, b0: int, b1: int, i0: int, i1: int, patch: int) -> None:
    """Adjoint of :func:`_neighbours`: scatter-add ``[n, P*P*G, c]`` back into the padded gradient (one index_add_)."""
    n_img, hp, wp = padded_grad.shape[:3]
    nb, nr, w = b1 - b0, i1 - i0, wp - patch + 1
    dev = grad.device
    rows = torch.arange(nr, device=dev).view(-1, 1, 1, 1) + torch.arange(patch, device=dev).view(1, 1, -1, 1)
    cols = torch.arange(w, device=dev).view(1, -1, 1, 1) + torch.arange(patch, device=dev).view(1, 1, 1, -1)
    index = ((torch.arange(nb, device=dev).view(-1, 1) * hp + (b0 * hp + i0)) * wp + (rows * wp + cols).view(1, -1))
    padded_grad.view(n_img * hp * wp, -1).index_add_(0, index.view(-1), grad.reshape(index.numel(), -1))


class _Scores:
    """The three logit terms of one chunk, each exponentiated after subtracting its own maximum.

    Their product is the score block ``[n, Gv, Gq, Gk, P*P]``; ``shift[n, Gv, Gq]``, the sum of the three maxima,
    bounds the row maximum of the logits."""

    def __init__(self, qc: Tensor, keys: Tensor, pos: Tensor, grp: Tensor | None, flat_index: Tensor | None,
                 bias: Tensor, scale: float, nb: int, n_gv: int,
                 maxima: tuple[Tensor, Tensor, Tensor | None] | None = None) -> None:
        n, gq, _ = qc.shape
        p2, dpos = pos.shape[1:]
        gk = keys.shape[1] // p2
        content = torch.bmm(qc, keys.transpose(1, 2)).view(nb, -1, gq, p2, gk).mul_(scale)
        content = content.add_(bias.view(1, -1, 1, p2, 1)).transpose(-2, -1).reshape(n, 1, gq, gk, p2)
        spatial = (qc[..., :dpos].reshape(n * gq, dpos) @ pos.reshape(-1, dpos).t()).mul_(scale)
        spatial = spatial.view(n, gq, n_gv, p2).transpose(1, 2).unsqueeze(3)  # [n, Gv, Gq, 1, P2]
        if maxima is None:
            c_max, s_max = content.amax((-2, -1), keepdim=True), spatial.amax(-1, keepdim=True)
        else:
            c_max, s_max = maxima[0].view(n, 1, gq, 1, 1), maxima[1].view(n, n_gv, gq, 1, 1)
        self.maxima = [c_max.view(n, 1, gq), s_max.view(n, n_gv, gq), None]
        self.exp_content = content.sub_(c_max).exp_()
        self.exp_spatial = (spatial - s_max).exp_()
        shift = c_max + s_max
        self.exp_group = None
        if grp is not None and flat_index is not None:
            dg = grp.shape[1]
            a = (qc[..., dpos:dpos + dg].reshape(n * gq, dg) @ grp.t()).mul_(scale).view(n, -1)
            group = a.index_select(1, flat_index).view(n, n_gv, gq, gk, 1)
            if maxima is None or maxima[2] is None:
                g_max = group.amax(-2, keepdim=True)
            else:
                g_max = maxima[2].view(n, n_gv, gq, 1, 1)
            self.maxima[2] = g_max.view(n, n_gv, gq)
            self.exp_group = group.sub_(g_max).exp_()
            shift = shift + g_max
        self.shift = shift.reshape(n, n_gv, gq)
        self.shape = (n, n_gv, gq, gk, p2)

    def block(self, spatial_factor: Tensor | None = None) -> Tensor:
        """``exp(logits - shift)`` (times ``spatial_factor[n, Gv, Gq]`` if given), ``[n, Gv, Gq, Gk, P2]``."""
        es = self.exp_spatial if spatial_factor is None else self.exp_spatial * spatial_factor[..., None, None]
        out = torch.empty(self.shape, dtype=es.dtype, device=es.device)
        torch.mul(self.exp_content, es, out=out)
        if self.exp_group is not None:
            out *= self.exp_group
        return out


def _exact_block(sc: _Scores, qc: Tensor, keys: Tensor, pos: Tensor, grp: Tensor | None, flat_index: Tensor | None,
                 bias: Tensor, scale: float, nb: int, n_gv: int, log_norm: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fallback when the per-term shift under/overflows: ``exp(logits - max)`` (or ``- log_norm``) the direct way."""
    n, gq, _ = qc.shape
    p2, dpos = pos.shape[1:]
    gk = keys.shape[1] // p2
    logits = torch.bmm(qc, keys.transpose(1, 2)).view(nb, -1, gq, p2, gk).add_(bias.view(1, -1, 1, p2, 1) / scale)
    logits = logits.transpose(-2, -1).reshape(n, 1, gq, gk, p2).expand(sc.shape).clone()
    spatial = (qc[..., :dpos].reshape(n * gq, dpos) @ pos.reshape(-1, dpos).t()).view(n, gq, n_gv, p2)
    logits += spatial.transpose(1, 2)[:, :, :, None]
    if grp is not None and flat_index is not None:
        dg = grp.shape[1]
        a = (qc[..., dpos:dpos + dg].reshape(n * gq, dg) @ grp.t()).view(n, -1)
        logits += a.index_select(1, flat_index).view(n, n_gv, gq, gk, 1)
    logits.mul_(scale)
    shift = logits.amax((-2, -1)) if log_norm is None else log_norm
    return logits.sub_(shift[..., None, None]).exp_(), shift


_DROP_BITS = 15


def _keep_mask(seed: int, chunk: int, shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """0/1 mask of kept scores (dropout probability ~p) from 15 random bits per score, 4 scores per 64-bit draw;
    redrawn identically in the backward pass from (seed, chunk)."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed + 7919 * chunk)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=like.device).random_(generator=gen)
    lanes = torch.bitwise_and(words.view(torch.int16)[:numel], (1 << _DROP_BITS) - 1).to(like.dtype)
    return lanes.mul_(1.0 / (1 << _DROP_BITS)).add_(1.0 - p).floor_().view(shape)


@cache
def _keep_scale(p: float, dtype: torch.dtype) -> float:
    """1 / P(keep) of :func:`_keep_mask`, counted exactly over the 2^15 lane values."""
    lanes = torch.arange(1 << _DROP_BITS, dtype=dtype)
    return (1 << _DROP_BITS) / lanes.mul_(1.0 / (1 << _DROP_BITS)).add_(1.0 - p).floor_().sum().item()


# ---- CPU pool: chunks run in threads of single-threaded ops (OpenMP inside many small ops collapses on a loaded
# CPU: 11x slower measured on 2 cores); each thread takes whole images, so gradient scatters never collide.
_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_POOL_LOCK = threading.Lock()


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid() or _POOL._max_workers != workers:  # noqa: SLF001
            if _POOL is not None and _POOL_PID == os.getpid():
                _POOL.shutdown(wait=True)  # (a pool inherited through fork has no threads: just replace it)
            main_threads = torch.get_num_threads()
            ready = threading.Barrier(workers)
            pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,),
                                      thread_name_prefix="gevit-attention")
            list(pool.map(lambda _: ready.wait(), range(workers)))  # start (and initialise) every worker
            torch.set_num_threads(main_threads)  # the initializer changed the process-wide default
            _POOL, _POOL_PID = pool, os.getpid()
        return _POOL


def _no_grad_call(task: Callable[[], Any]) -> Any:
    with torch.no_grad():  # grad mode is thread-local: workers start with it on
        return task()


def _run_groups(tasks: list[Callable[[], Any]], device: torch.device) -> list[Any]:
    workers = min(torch.get_num_threads(), len(tasks))
    if device.type != "cpu" or workers < 2:
        return [task() for task in tasks]
    return list(_cpu_pool(workers).map(_no_grad_call, tasks))


def _chunk_groups(chunks: list[tuple[int, int, int, int]], n_groups: int) -> list[list[int]]:
    """Split chunk ids into up to ``n_groups`` contiguous groups that never share an image (disjoint gradients)."""
    starts = [c for c, (_, _, i0, _) in enumerate(chunks) if i0 == 0]
    if n_groups < 2 or len(starts) < 2:
        return [list(range(len(chunks)))]
    n_groups = min(n_groups, len(starts))
    cuts = [starts[round(g * len(starts) / n_groups)] for g in range(n_groups)] + [len(chunks)]
    return [list(range(cuts[g], cuts[g + 1])) for g in range(n_groups) if cuts[g] < cuts[g + 1]]


# Below this many score elements per layer call the pool costs more than it gains (2 cores: layers of 3.3 M ran
# 1.9x slower with it, GE-ViT's of 4-90 M gain): tiny chunks compete with OpenMP's still-spinning workers.
POOL_MIN_ELEMENTS = 4 << 20


def _n_groups(device: torch.device, elements: int) -> int:
    return torch.get_num_threads() if device.type == "cpu" and elements >= POOL_MIN_ELEMENTS else 1


def _setup(q: Tensor, k: Tensor, v: Tensor, n_gv: int, p2: int, patch: int,
           budget: int) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int, int, int]]]:
    """Zero-padded keys and values, the border bias and the chunks (the same in the forward and backward pass)."""
    n_img, height, width, gq, _ = q.shape
    r = patch // 2
    kp, vp = F.pad(k, (0, 0, 0, 0, r, r, r, r)), F.pad(v, (0, 0, 0, 0, r, r, r, r))
    bias = _border_bias(height, width, patch, q.dtype, q.device)
    return kp, vp, bias, list(_chunks(n_img, height, width * n_gv * gq * p2 * k.shape[3], budget))


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None,
                scale: float, patch: int, dropout: float, seed: int, budget: int) -> Tensor:
        n_img, height, width, gq, _ = q.shape
        gk, dv = k.shape[3], v.shape[4]
        n_gv, p2 = pos.shape[:2]
        kp, vp, bias, chunks = _setup(q, k, v, n_gv, p2, patch, budget)
        flat_index = None
        if grp is not None and gidx is not None:
            flat_index = (torch.arange(gq, device=q.device).view(1, -1, 1) * grp.shape[0] + gidx).reshape(-1)
        tiny = torch.finfo(q.dtype).tiny * 1e8
        out = q.new_empty(n_img, height, width, n_gv, dv)
        lse = q.new_empty(n_img, height, width, n_gv, gq)  # log normaliser per (x, v, g)
        c_max = q.new_empty(n_img, height, width, gq)  # the three per-term maxima (the shift of _Scores)
        s_max = q.new_empty(n_img, height, width, n_gv, gq)
        g_max = q.new_zeros(n_img, height, width, n_gv, gq)

        def run(ids: list[int]) -> list[int]:
            exact: list[int] = []
            for c in ids:
                b0, b1, i0, i1 = chunks[c]
                nb, nr = b1 - b0, i1 - i0
                qc = q[b0:b1, i0:i1].reshape(-1, gq, q.shape[-1])
                n = qc.shape[0]
                keys = _neighbours(kp, b0, b1, i0, i1, patch)
                sc = _Scores(qc, keys, pos, grp, flat_index, bias[i0:i1], scale, nb, n_gv)
                e, shift = sc.block(), sc.shift
                total = e.sum((-2, -1))  # [n, Gv, Gq]
                if bool((total < tiny).any()):  # the shift bound was too loose for this chunk
                    exact.append(c)
                    e, shift = _exact_block(sc, qc, keys, pos, grp, flat_index, bias[i0:i1], scale, nb, n_gv, None)
                    total = e.sum((-2, -1))
                lse[b0:b1, i0:i1] = (shift + total.log()).view(nb, nr, width, n_gv, gq)
                c_max[b0:b1, i0:i1] = sc.maxima[0].view(nb, nr, width, gq)
                s_max[b0:b1, i0:i1] = sc.maxima[1].view(nb, nr, width, n_gv, gq)
                if sc.maxima[2] is not None:
                    g_max[b0:b1, i0:i1] = sc.maxima[2].view(nb, nr, width, n_gv, gq)
                inv = total.reciprocal_()
                if dropout > 0:
                    e.mul_(_keep_mask(seed, c, e.shape, dropout, e))
                    inv *= _keep_scale(dropout, e.dtype)
                weights = torch.bmm(inv.view(n * n_gv, 1, gq), e.reshape(n * n_gv, gq, -1))  # sum over g of p
                weights = weights.view(n, n_gv, gk, p2).transpose(2, 3).reshape(n, n_gv, -1)  # (delta, m) order
                values = _neighbours(vp, b0, b1, i0, i1, patch)
                out[b0:b1, i0:i1] = torch.bmm(weights, values).view(nb, nr, width, n_gv, dv)
            return exact

        elements = n_img * height * width * n_gv * gq * p2 * gk
        groups = _chunk_groups(chunks, _n_groups(q.device, elements))
        exact_chunks = [c for ex in _run_groups([partial(run, ids) for ids in groups], q.device) for c in ex]
        ctx.save_for_backward(q, k, v, pos, grp, flat_index, lse, c_max, s_max, g_max)
        ctx.config = (scale, patch, dropout, seed, budget, tuple(exact_chunks), len(groups))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q = ctx.saved_tensors[0]
        with torch.autocast(q.device.type, enabled=False):
            grads = _backward(grad_out, *ctx.saved_tensors, *ctx.config)
        return (*grads, None, None, None, None, None, None)


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None,
              flat_index: Tensor | None, lse: Tensor, c_max: Tensor, s_max: Tensor, g_max: Tensor, scale: float,
              patch: int, dropout: float, seed: int, budget: int, exact_chunks: tuple[int, ...],
              n_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    n_img, height, width, gq, d = q.shape
    gk, dv = k.shape[3], v.shape[4]
    n_gv, p2, dpos = pos.shape
    kp, vp, bias, chunks = _setup(q, k, v, n_gv, p2, patch, budget)
    grad_out = grad_out.contiguous()
    dq = torch.empty_like(q)
    dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
    keep_scale = _keep_scale(dropout, q.dtype) if dropout > 0 else 1.0

    def run(ids: list[int]) -> tuple[Tensor, Tensor | None]:
        dpos_tab = torch.zeros_like(pos)
        dgrp = torch.zeros_like(grp) if grp is not None else None
        for c in ids:
            b0, b1, i0, i1 = chunks[c]
            nb, nr = b1 - b0, i1 - i0
            qc = q[b0:b1, i0:i1].reshape(-1, gq, d)
            n = qc.shape[0]
            keys = _neighbours(kp, b0, b1, i0, i1, patch)
            values = _neighbours(vp, b0, b1, i0, i1, patch)
            maxima = (c_max[b0:b1, i0:i1], s_max[b0:b1, i0:i1], g_max[b0:b1, i0:i1] if grp is not None else None)
            sc = _Scores(qc, keys, pos, grp, flat_index, bias[i0:i1], scale, nb, n_gv, maxima)  # type: ignore[arg-type]
            log_norm = lse[b0:b1, i0:i1].reshape(n, n_gv, gq)
            if c in exact_chunks:
                prob = _exact_block(sc, qc, keys, pos, grp, flat_index, bias[i0:i1], scale, nb, n_gv, log_norm)[0]
            else:
                prob = sc.block((sc.shift - log_norm).exp_())  # exp(logits - lse)
            prob = prob.reshape(n, n_gv, gq, -1)  # [n, Gv, Gq, K], K in (m, delta) order
            go = grad_out[b0:b1, i0:i1].reshape(n, n_gv, dv)
            dprob = torch.bmm(go, values.transpose(1, 2))  # d out / d p, the same for every g: [n, Gv, (delta, m)]
            dprob = dprob.view(n, n_gv, p2, gk).transpose(2, 3).reshape(n, n_gv, 1, -1)
            if dropout > 0:
                kept = prob * _keep_mask(seed, c, prob.shape, dropout, prob)
                dlogit = torch.mul(kept, dprob * keep_scale)  # p * dL/dp
                weights = kept.sum(2).mul_(keep_scale)
            else:
                dlogit = torch.mul(prob, dprob)
                weights = prob.sum(2)
            row = dlogit.sum(-1, keepdim=True)
            dlogit.addcmul_(prob, row, value=-1.0)  # softmax backward: p * (dL/dp - sum p dL/dp)
            weights = weights.view(n, n_gv, gk, p2).transpose(2, 3).reshape(n, n_gv, -1)
            dvalues = torch.bmm(weights.transpose(1, 2), go)
            dl5 = dlogit.view(n, n_gv, gq, gk, p2)
            dcontent = dl5.sum(1).mul_(scale).transpose(-2, -1).reshape(n, gq, -1)  # [n, Gq, (delta, m)]
            dspatial = dl5.sum(-2).mul_(scale)  # [n, Gv, Gq, P2]
            dqc = torch.bmm(dcontent, keys)
            dkeys = torch.bmm(dcontent.transpose(1, 2), qc)
            ds = dspatial.transpose(1, 2).reshape(n * gq, n_gv * p2)
            dqc[..., :dpos] += (ds @ pos.reshape(-1, dpos)).view(n, gq, dpos)
            dpos_tab += (ds.t() @ qc[..., :dpos].reshape(n * gq, dpos)).view_as(pos)
            if grp is not None and flat_index is not None and dgrp is not None:
                n_j, dg = grp.shape
                dgroup = dl5.sum(-1).mul_(scale).reshape(n, -1)  # [n, Gv*Gq*Gk]
                da = qc.new_zeros(n, gq * n_j).index_add_(1, flat_index, dgroup).view(n * gq, n_j)
                dqc[..., dpos:dpos + dg] += (da @ grp).view(n, gq, dg)
                dgrp += da.t() @ qc[..., dpos:dpos + dg].reshape(n * gq, dg)
            dq[b0:b1, i0:i1] = dqc.view(nb, nr, width, gq, d)
            _fold_add(dkp, dkeys, b0, b1, i0, i1, patch)
            _fold_add(dvp, dvalues, b0, b1, i0, i1, patch)
        return dpos_tab, dgrp

    partials = _run_groups([partial(run, ids) for ids in _chunk_groups(chunks, n_groups)], q.device)
    dpos_tab = torch.stack([p[0] for p in partials]).sum(0)
    dgrp = torch.stack([p[1] for p in partials]).sum(0) if grp is not None else None
    r = patch // 2
    return dq, dkp[:, r:r + height, r:r + width], dvp[:, r:r + height, r:r + width], dpos_tab, dgrp


class _KernelAttention(torch.autograd.Function):
    """The fused CPU kernel (:mod:`gevit_lib.nn.cpu_kernel`) on packed heads: ``qkv [B, H, W, G, 3, d, heads]`` ->
    ``[B, H, W, Gv, d, heads]``. The kernel reads q, k, v in place and writes their gradients into one tensor."""

    @staticmethod
    def forward(ctx, qkv: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None, scale: float, patch: int,
                dropout: float, seed: int) -> Tensor:
        ext = cpu_kernel.load()
        assert ext is not None
        g = grp if grp is not None else qkv.new_empty(0)
        gi = gidx.to(torch.int64).contiguous() if gidx is not None else torch.empty(0, dtype=torch.int64)
        out, lse, keep = ext.forward(*qkv.unbind(4), pos, g, gi, scale, patch, dropout, seed)  # keep: dropout's bits
        ctx.save_for_backward(qkv, pos, g, gi, lse, keep)
        ctx.config = (scale, patch, dropout, grp is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        ext = cpu_kernel.load()
        assert ext is not None
        scale, patch, dropout, has_group = ctx.config
        qkv, pos, g, gi, lse, keep = ctx.saved_tensors
        dqkv = torch.empty_like(qkv)  # every element is written
        dpos, dgrp = ext.backward(grad_out.to(qkv.dtype), *qkv.unbind(4), pos, g, gi, lse, keep, scale,  # any strides
                                  patch, dropout, *dqkv.unbind(4))
        return dqkv, dpos, (dgrp if has_group else None), None, None, None, None, None


BACKENDS: tuple[str, ...] = ("auto", "kernel", "chunked", "triton")


def _use_kernel(backend: str, device: torch.device) -> bool:
    if backend in ("chunked", "triton") or (backend == "auto" and device.type != "cpu"):
        return False
    if device.type != "cpu":
        raise ValueError(f"backend 'kernel' is the fused CPU kernel; tensors are on {device}")
    if cpu_kernel.load() is None:
        if backend == "kernel":
            raise RuntimeError(f"the fused CPU attention kernel is unavailable: {cpu_kernel.unavailable_reason()}")
        return False
    return True


def _check_arguments(pos: Tensor, patch_size: int, backend: str) -> None:
    if patch_size % 2 != 1:
        raise ValueError(f"patch_size must be odd, got {patch_size}")
    if pos.shape[1] != patch_size * patch_size:
        raise ValueError(f"positional table has {pos.shape[1]} offsets, patch {patch_size} needs {patch_size ** 2}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def fast_local_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None, *,
                         scale: float, patch_size: int, dropout: float = 0.0,
                         chunk_elements: int | None = None, backend: str = "auto") -> Tensor:
    """Local (lifting or group) self-attention without materialising the full score tensor; see the module docstring.

    ``backend``: "kernel" is the fused CPU kernel (:mod:`gevit_lib.nn.cpu_kernel`), "chunked" the torch path of
    this module (any device), "auto" the kernel on CPU when it builds, else the chunked path.
    ``dropout`` > 0 drops attention probabilities (as ``nn.Dropout`` would) with masks drawn from a seed taken
    from torch's default generator, so the backward pass can redraw them.
    """
    _check_arguments(pos, patch_size, backend)
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0
    if triton_attention.selected(backend, q.device):  # CUDA: the Triton kernels (GEVIT_CUDA_KERNEL chooses)
        return triton_attention.triton_local_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=patch_size,
                                                       dropout=dropout, seed=seed)
    if _use_kernel(backend, q.device):
        if q.shape == k.shape == v.shape:  # one head: packed for the kernel
            out = packed_local_attention(torch.stack([q, k, v], dim=4).unsqueeze(-1), pos, grp, gidx, scale=scale,
                                         patch_size=patch_size, dropout=dropout, backend=backend, seed=seed)
            return out[..., 0]
        if backend == "kernel":
            raise ValueError(f"the fused CPU kernel needs q, k, v of one shape, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
    args = [t.to(work).contiguous() if t is not None else None for t in (q, k, v, pos, grp)]
    budget = chunk_elements or default_chunk_elements(q.device)
    with torch.autocast(q.device.type, enabled=False):
        out = _LocalAttention.apply(*args, gidx, float(scale), int(patch_size), float(dropout), seed, int(budget))
    return out.to(dtype)


def packed_local_attention(qkv: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None, *, scale: float,
                           patch_size: int, dropout: float = 0.0, backend: str = "auto",
                           seed: int | None = None) -> Tensor:
    """:func:`fast_local_attention` on the heads of a layer's projection ``qkv [B, H, W, G, 3, d, heads]``:
    ``[B, H, W, Gv, d, heads]``. The CPU kernel reads the heads in place (and writes one gradient for qkv); other
    backends get the heads split into images, ``[B * heads, H, W, G, d]`` each. ``seed``: dropout's (default: drawn
    from torch's generator)."""
    _check_arguments(pos, patch_size, backend)
    if qkv.dim() != 7 or qkv.shape[4] != 3:
        raise ValueError(f"qkv must be [B, H, W, G, 3, d, heads], got {tuple(qkv.shape)}")
    if triton_attention.selected(backend, qkv.device) or not _use_kernel(backend, qkv.device):
        q, k, v = qkv.permute(4, 0, 6, 1, 2, 3, 5).flatten(1, 2).unbind(0)  # [B * heads, H, W, G, d] each
        out = fast_local_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=patch_size, dropout=dropout,
                                   backend=backend)  # [B * heads, H, W, Gv, d]
        return out.unflatten(0, (qkv.shape[0], qkv.shape[6])).permute(0, 2, 3, 4, 5, 1)
    dtype = qkv.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0
    with torch.autocast(qkv.device.type, enabled=False):
        out = _KernelAttention.apply(qkv.to(work), pos.to(work).contiguous(), None if grp is None else grp.to(work),
                                     gidx, float(scale), int(patch_size), float(dropout), seed)
    return out.to(dtype)
