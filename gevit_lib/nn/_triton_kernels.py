"""Triton kernels of the local lifting / group self-attention (imported lazily by :mod:`.triton_attention`).

Importing this module imports triton and defines the kernels; with ``TRITON_INTERPRET=1`` set before the import they
run in triton's interpreter on CPU tensors (how the tests check them without a GPU).

For query pixel x, output element v and query element g, the logits over the columns (key element m, offset d) are

    L[x, v, g, m, d] = scale * q[x, g] . (k[x+d, m] + pos~[v, d] + grp~[gidx[v, g, m]])

where pos~ is the positional table zero-padded to the D query channels (it meets ``q[:, :Dpos]``) and grp~ the group
table moved to channels Dpos..Dpos+Dg: one dot product with an "effective key". Offsets outside the image are masked.
A softmax row is one (x, v, g); a tile holds BX pixels x BG query elements as rows and BR columns.

- ``_fwd``: one program per (block of pixels, v); an online softmax over the column blocks (the running maximum is
  rescaled as it grows, so every row is normalised by its exact maximum up to rounding), then the sum over g.
  Saves only the log-normaliser ``lse[x, v, g]``.
- ``_bwd_query``: programs loop over pixel blocks; per v, a first sweep gives delta = sum p * dP (the softmax
  backward's row term), a second recomputes dL = p * (dP - delta): dq, and per-program partial sums of the
  positional / group table gradients (summed afterwards in torch: no contention between programs).
- ``_bwd_key``: one program per (block of key pixels y, m), columns (v, g, d): the gradients of k[y, m] and
  v[y, m] gathered from the query pixels x = y - d that see y (no scatter).

Dropout keeps a score when a Philox draw ``tl.rand(seed, counter)`` >= p; the counter numbers the score
(x, v, g, m, d), so every kernel (and :func:`keep_mask_kernel`) draws the same mask.
Layouts (contiguous): q ``[N, H, W, Gq, D]``, k ``[N, H, W, Gk, D]``, v ``[N, H, W, Gk, Dv]``, pos ``[Gv, P*P, Dpos]``
(offset d = row * P + column), grp ``[J, Dg]``, gidx ``[Gv, Gq, Gk]`` int32, out ``[N, H, W, Gv, Dv]``,
lse and delta ``[N, H, W, Gv, Gq]``. Pixels are numbered x = (n * H + i) * W + j.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keep(seed, x, v, g, m, d, GV: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr, P2: tl.constexpr, p_drop):
    """Dropout decision of score (x, v, g, m, d), the same in every kernel (int64 counter: no wrap-around)."""
    counter = (((x.to(tl.int64) * GV + v) * GQ + g) * GK + m) * P2 + d
    return tl.rand(seed, counter) >= p_drop


@triton.jit
def _rows(blk, n_pix, H, W, GQ: tl.constexpr, BX: tl.constexpr, BG: tl.constexpr):
    """Rows (pixel x, query element g) of tile ``blk``: x, g, row i, column j, image n, validity; each [BX * BG]."""
    t = tl.arange(0, BX * BG)
    x = blk * BX + t // BG
    g = t % BG
    return x, g, (x // W) % H, x % W, x // (H * W), (x < n_pix) & (g < GQ)


@triton.jit
def _columns(r0, i, j, n, ok, H, W, GK: tl.constexpr, P: tl.constexpr, BR: tl.constexpr):
    """Columns r0.. = (m, d): m, d [BR], the neighbour pixel x + d and whether it counts [rows, BR]."""
    P2: tl.constexpr = P * P
    r = r0 + tl.arange(0, BR)
    m = r // P2
    d = r % P2
    ni = i[:, None] + d[None, :] // P - P // 2
    nj = j[:, None] + d[None, :] % P - P // 2
    inside = ok[:, None] & (r[None, :] < GK * P2) & (ni >= 0) & (ni < H) & (nj >= 0) & (nj < W)
    return m, d, (n[:, None] * H + ni) * W + nj, inside


@triton.jit
def _logits(q, K, POS, GRP, GIDX, v, g, ok, m, d, nb, inside, scale, GQ: tl.constexpr, GK: tl.constexpr,
            D: tl.constexpr, DPOS: tl.constexpr, DG: tl.constexpr, P: tl.constexpr, BD: tl.constexpr,
            HAS_GROUP: tl.constexpr):
    """The effective keys [rows, BR, BD] and the logits [rows, BR] (-inf where the neighbour does not count)."""
    P2: tl.constexpr = P * P
    c = tl.arange(0, BD)
    col = m < GK
    key = tl.load(K + (nb[:, :, None] * GK + m[None, :, None]) * D + c[None, None, :],
                  mask=inside[:, :, None] & (c[None, None, :] < D), other=0.0)
    pos = tl.load(POS + (v * P2 + d[:, None]) * DPOS + c[None, :], mask=col[:, None] & (c[None, :] < DPOS), other=0.0)
    key = key + pos[None, :, :]
    if HAS_GROUP:
        sel = ok[:, None] & col[None, :]
        jx = tl.load(GIDX + (v * GQ + g[:, None]) * GK + m[None, :], mask=sel, other=0)  # [rows, BR]
        grp_ch = (c >= DPOS) & (c < DPOS + DG)
        key = key + tl.load(GRP + jx[:, :, None] * DG + (c - DPOS)[None, None, :],
                            mask=sel[:, :, None] & grp_ch[None, None, :], other=0.0)
    logit = tl.sum(q[:, None, :] * key, 2) * scale
    return key, tl.where(inside, logit, float("-inf"))


@triton.jit
def _fwd(Q, K, V, POS, GRP, GIDX, OUT, LSE, n_pix, H, W, scale, p_drop, keep_scale, seed,
         GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
         DPOS: tl.constexpr, DG: tl.constexpr, P: tl.constexpr, BX: tl.constexpr, BG: tl.constexpr,
         BR: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, HAS_GROUP: tl.constexpr, DROPOUT: tl.constexpr):
    P2: tl.constexpr = P * P
    v = tl.program_id(1)
    x, g, i, j, n, ok = _rows(tl.program_id(0), n_pix, H, W, GQ, BX, BG)
    c = tl.arange(0, BD)
    cv = tl.arange(0, BDV)
    q = tl.load(Q + (x[:, None] * GQ + g[:, None]) * D + c[None, :], mask=ok[:, None] & (c[None, :] < D), other=0.0)
    m_i = tl.full([BX * BG], -1e30, dtype=q.dtype)  # running maximum, sum and weighted values of every row
    l_i = tl.zeros([BX * BG], dtype=q.dtype)
    acc = tl.zeros([BX * BG, BDV], dtype=q.dtype)
    for r0 in range(0, GK * P2, BR):
        m, d, nb, inside = _columns(r0, i, j, n, ok, H, W, GK, P, BR)
        _, logit = _logits(q, K, POS, GRP, GIDX, v, g, ok, m, d, nb, inside, scale, GQ, GK, D, DPOS, DG, P, BD,
                           HAS_GROUP)
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logit - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(seed, x[:, None], v, g[:, None], m[None, :], d[None, :], GV, GQ, GK, P2, p_drop)
            p = tl.where(keep, p * keep_scale, 0.0)
        vals = tl.load(V + (nb[:, :, None] * GK + m[None, :, None]) * DV + cv[None, None, :],
                       mask=inside[:, :, None] & (cv[None, None, :] < DV), other=0.0)  # [rows, BR, BDV]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vals, 1)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # (0 only in padding rows)
    tl.store(LSE + (x * GV + v) * GQ + g, m_i + tl.log(l_safe), mask=ok)
    out = tl.sum(tl.reshape(acc / l_safe[:, None], [BX, BG, BDV]), 1)  # sum over g
    xo = tl.program_id(0) * BX + tl.arange(0, BX)
    tl.store(OUT + (xo[:, None] * GV + v) * DV + cv[None, :], out, mask=(xo[:, None] < n_pix) & (cv[None, :] < DV))


@triton.jit
def _bwd_query(Q, K, V, POS, GRP, GIDX, LSE, GO, DQ, DELTA, DPOS_PART, DGRP_PART, n_pix, n_blocks, H, W, scale,
               p_drop, keep_scale, seed,
               GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               DPOS: tl.constexpr, DG: tl.constexpr, J: tl.constexpr, P: tl.constexpr, BX: tl.constexpr,
               BG: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, HAS_GROUP: tl.constexpr,
               DROPOUT: tl.constexpr):
    P2: tl.constexpr = P * P
    prog = tl.program_id(0)
    c = tl.arange(0, BD)
    cv = tl.arange(0, BDV)
    gg = tl.arange(0, BG)
    grp_ch = (c >= DPOS) & (c < DPOS + DG)
    dpos_slot = DPOS_PART + prog * (GV * P2 * DPOS)  # this program's partial sums (it alone adds to them)
    dgrp_slot = DGRP_PART + prog * (J * DG)
    for blk in range(prog, n_blocks, tl.num_programs(0)):
        x, g, i, j, n, ok = _rows(blk, n_pix, H, W, GQ, BX, BG)
        q_ok = ok[:, None] & (c[None, :] < D)
        q = tl.load(Q + (x[:, None] * GQ + g[:, None]) * D + c[None, :], mask=q_ok, other=0.0)
        dq = tl.zeros([BX * BG, BD], dtype=q.dtype)
        for v in range(GV):
            lse = tl.load(LSE + (x * GV + v) * GQ + g, mask=ok, other=0.0)
            go = tl.load(GO + (x[:, None] * GV + v) * DV + cv[None, :], mask=ok[:, None] & (cv[None, :] < DV),
                         other=0.0)  # [rows, BDV]
            delta = tl.zeros([BX * BG], dtype=q.dtype)
            for sweep in tl.static_range(2):  # delta = sum p * dP first, then dL = p * (dP - delta)
                for r0 in range(0, GK * P2, BR):
                    m, d, nb, inside = _columns(r0, i, j, n, ok, H, W, GK, P, BR)
                    key, logit = _logits(q, K, POS, GRP, GIDX, v, g, ok, m, d, nb, inside, scale, GQ, GK, D, DPOS,
                                         DG, P, BD, HAS_GROUP)
                    p = tl.where(inside, tl.exp(logit - lse[:, None]), 0.0)
                    vals = tl.load(V + (nb[:, :, None] * GK + m[None, :, None]) * DV + cv[None, None, :],
                                   mask=inside[:, :, None] & (cv[None, None, :] < DV), other=0.0)
                    dp = tl.sum(go[:, None, :] * vals, 2)  # d loss / d (kept, scaled) probability
                    if DROPOUT:
                        keep = _keep(seed, x[:, None], v, g[:, None], m[None, :], d[None, :], GV, GQ, GK, P2, p_drop)
                        dp = tl.where(keep, dp * keep_scale, 0.0)
                    if sweep == 0:
                        delta += tl.sum(p * dp, 1)
                    else:
                        dl = p * (dp - delta[:, None]) * scale  # d loss / d (q . effective key)
                        dq += tl.sum(dl[:, :, None] * key, 1)
                        dkey = tl.sum(tl.reshape(dl[:, :, None] * q[:, None, :], [BX, BG, BR, BD]), 0)  # [BG, BR, BD]
                        col = m < GK
                        tl.atomic_add(dpos_slot + (v * P2 + d[:, None]) * DPOS + c[None, :], tl.sum(dkey, 0),
                                      mask=col[:, None] & (c[None, :] < DPOS))
                        if HAS_GROUP:
                            sel = (gg[:, None] < GQ) & col[None, :]
                            jx = tl.load(GIDX + (v * GQ + gg[:, None]) * GK + m[None, :], mask=sel, other=0)
                            tl.atomic_add(dgrp_slot + jx[:, :, None] * DG + (c - DPOS)[None, None, :], dkey,
                                          mask=sel[:, :, None] & grp_ch[None, None, :])
            tl.store(DELTA + (x * GV + v) * GQ + g, delta, mask=ok)
        tl.store(DQ + (x[:, None] * GQ + g[:, None]) * D + c[None, :], dq, mask=q_ok)


@triton.jit
def _bwd_key(Q, K, V, POS, GRP, GIDX, LSE, GO, DELTA, DK, DV_, n_pix, H, W, scale, p_drop, keep_scale, seed,
             GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
             DPOS: tl.constexpr, DG: tl.constexpr, P: tl.constexpr, BX: tl.constexpr, BS: tl.constexpr,
             BD: tl.constexpr, BDV: tl.constexpr, HAS_GROUP: tl.constexpr, DROPOUT: tl.constexpr):
    P2: tl.constexpr = P * P
    m = tl.program_id(1)
    ys = tl.program_id(0) * BX + tl.arange(0, BX)
    ymask = ys < n_pix
    i = (ys // W) % H
    j = ys % W
    n = ys // (H * W)
    c = tl.arange(0, BD)
    cv = tl.arange(0, BDV)
    grp_ch = (c >= DPOS) & (c < DPOS + DG)
    k_y = tl.load(K + (ys[:, None] * GK + m) * D + c[None, :], mask=ymask[:, None] & (c[None, :] < D), other=0.0)
    v_y = tl.load(V + (ys[:, None] * GK + m) * DV + cv[None, :], mask=ymask[:, None] & (cv[None, :] < DV), other=0.0)
    dk = tl.zeros([BX, BD], dtype=k_y.dtype)
    dv = tl.zeros([BX, BDV], dtype=k_y.dtype)
    for s0 in range(0, GV * GQ * P2, BS):  # columns (v, g, d)
        s = s0 + tl.arange(0, BS)
        col = s < GV * GQ * P2
        v = s // (GQ * P2)
        g = (s // P2) % GQ
        d = s % P2
        xi = i[:, None] - d[None, :] // P + P // 2  # the query pixel whose offset d lands on y
        xj = j[:, None] - d[None, :] % P + P // 2
        seen = ymask[:, None] & col[None, :] & (xi >= 0) & (xi < H) & (xj >= 0) & (xj < W)
        xs = (n[:, None] * H + xi) * W + xj  # [BX, BS]
        key = k_y[:, None, :] + tl.load(POS + (v[:, None] * P2 + d[:, None]) * DPOS + c[None, :],
                                        mask=col[:, None] & (c[None, :] < DPOS), other=0.0)[None, :, :]
        if HAS_GROUP:
            jx = tl.load(GIDX + (v * GQ + g) * GK + m, mask=col, other=0)
            key = key + tl.load(GRP + jx[:, None] * DG + (c - DPOS)[None, :], mask=col[:, None] & grp_ch[None, :],
                                other=0.0)[None, :, :]
        q = tl.load(Q + (xs[:, :, None] * GQ + g[None, :, None]) * D + c[None, None, :],
                    mask=seen[:, :, None] & (c[None, None, :] < D), other=0.0)  # [BX, BS, BD]
        logit = tl.sum(q * key, 2) * scale
        row = (xs * GV + v[None, :]) * GQ + g[None, :]
        p = tl.where(seen, tl.exp(logit - tl.load(LSE + row, mask=seen, other=0.0)), 0.0)
        delta = tl.load(DELTA + row, mask=seen, other=0.0)
        go = tl.load(GO + (xs[:, :, None] * GV + v[None, :, None]) * DV + cv[None, None, :],
                     mask=seen[:, :, None] & (cv[None, None, :] < DV), other=0.0)  # [BX, BS, BDV]
        dp = tl.sum(go * v_y[:, None, :], 2)
        kept = p
        if DROPOUT:
            keep = _keep(seed, xs, v[None, :], g[None, :], m, d[None, :], GV, GQ, GK, P2, p_drop)
            kept = tl.where(keep, p * keep_scale, 0.0)
        dl = (kept * dp - p * delta) * scale
        dk += tl.sum(dl[:, :, None] * q, 1)
        dv += tl.sum(kept[:, :, None] * go, 1)
    tl.store(DK + (ys[:, None] * GK + m) * D + c[None, :], dk, mask=ymask[:, None] & (c[None, :] < D))
    tl.store(DV_ + (ys[:, None] * GK + m) * DV + cv[None, :], dv, mask=ymask[:, None] & (cv[None, :] < DV))


@triton.jit
def keep_mask_kernel(MASK, total, seed, p_drop, GV: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr,
                     P2: tl.constexpr, BLOCK: tl.constexpr):
    """MASK[x, v, g, m, d] = the dropout decision of score (x, v, g, m, d) (for checks)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    d = idx % P2
    m = (idx // P2) % GK
    g = (idx // (P2 * GK)) % GQ
    v = (idx // (P2 * GK * GQ)) % GV
    x = idx // (P2 * GK * GQ * GV)
    tl.store(MASK + idx, _keep(seed, x, v, g, m, d, GV, GQ, GK, P2, p_drop).to(tl.int8), mask=idx < total)
