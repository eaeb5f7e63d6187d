"""Triton kernels of the local lifting / group self-attention (imported lazily by :mod:`.triton_attention`).

Importing this module imports triton and defines the kernels; with ``TRITON_INTERPRET=1`` set before the import they
run in triton's interpreter on CPU tensors (how the tests check them without a GPU).

Per query pixel x, output element v and query element g the logits over (key element m, offset d) are

    L[v, g, m, d] = scale * q[x, g] . (k[x+d, m] + pos~[v, d] + grp~[gidx[v, g, m]])

where pos~ is the positional table padded with zeros to the D query channels (it meets ``q[:, :Dpos]``) and grp~ the
group table shifted to channels Dpos..Dpos+Dg; offsets outside the image are masked. The three kernels:

- ``fwd``: one program per (block of BX pixels, v); an online softmax over (offset block, m) per g (the running
  maximum is rescaled as it grows, so each row is normalised by its exact maximum up to rounding), summed over g.
  Saves only the log-normaliser ``lse[x, v, g]``.
- ``bwd_query``: per block of pixels, for every (g, v): first delta = sum_{m,d} p * dP (the softmax backward's
  row term), then dL = p * (dP - delta) recomputed block by block, giving dq and per-program partial sums of the
  positional and group table gradients (summed afterwards in torch: deterministic, no global atomics).
- ``bwd_key``: one program per (block of key pixels y, m): the gradients of k[y, m] and v[y, m], gathering the
  query pixels x = y - d that see y (no scatter, no atomics).

Dropout keeps a score when a Philox draw ``tl.rand(seed, counter)`` >= p; the counter numbers the score
(x, v, g, m, d) in the layout of the plain path, so both passes (and :func:`keep_mask_kernel`) draw the same mask.
Layouts (contiguous): q ``[N, H, W, Gq, D]``, k ``[N, H, W, Gk, D]``, v ``[N, H, W, Gk, Dv]``, pos ``[Gv, P*P, Dpos]``
(offset d = row * P + column), grp ``[J, Dg]``, gidx ``[Gv, Gq, Gk]`` int32, out ``[N, H, W, Gv, Dv]``,
lse and delta ``[N, H, W, Gv, Gq]``. Pixels are numbered x = (n * H + i) * W + j.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keep(seed, x, v, g, m, d, GV: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr, P2: tl.constexpr, p_drop):
    """Dropout decision of score (x, v, g, m, d): the same in every kernel (int64 counter: no wrap-around)."""
    counter = (((x.to(tl.int64) * GV + v) * GQ + g) * GK + m) * P2 + d
    return tl.rand(seed, counter) >= p_drop


@triton.jit
def _fwd(Q, K, V, POS, GRP, GIDX, OUT, LSE, n_pix, H, W, scale, p_drop, keep_scale, seed,
         GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
         DPOS: tl.constexpr, DG: tl.constexpr, P: tl.constexpr, BX: tl.constexpr, BP: tl.constexpr,
         BD: tl.constexpr, BDV: tl.constexpr, HAS_GROUP: tl.constexpr, DROPOUT: tl.constexpr):
    P2: tl.constexpr = P * P
    R: tl.constexpr = P // 2
    v = tl.program_id(1)
    xs = tl.program_id(0) * BX + tl.arange(0, BX)
    xmask = xs < n_pix
    i = (xs // W) % H
    j = xs % W
    n = xs // (H * W)
    c = tl.arange(0, BD)
    cv = tl.arange(0, BDV)
    q_ok = xmask[:, None] & (c[None, :] < D)
    grp_ch = (c >= DPOS) & (c < DPOS + DG)
    out = tl.zeros([BX, BDV], dtype=OUT.dtype.element_ty)
    for g in range(GQ):
        qg = tl.load(Q + (xs[:, None] * GQ + g) * D + c[None, :], mask=q_ok, other=0.0) * scale  # [BX, BD]
        m_i = tl.full([BX], -1e30, dtype=qg.dtype)  # running maximum, sum and weighted values of the row
        l_i = tl.zeros([BX], dtype=qg.dtype)
        acc = tl.zeros([BX, BDV], dtype=qg.dtype)
        for d0 in range(0, P2, BP):
            d = d0 + tl.arange(0, BP)
            ni = i[:, None] + d[None, :] // P - R  # [BX, BP] neighbour row and column
            nj = j[:, None] + d[None, :] % P - R
            inside = xmask[:, None] & (d[None, :] < P2) & (ni >= 0) & (ni < H) & (nj >= 0) & (nj < W)
            nb = (n[:, None] * H + ni) * W + nj
            pos = tl.load(POS + (v * P2 + d[:, None]) * DPOS + c[None, :],
                          mask=(d[:, None] < P2) & (c[None, :] < DPOS), other=0.0)  # [BP, BD]
            spatial = tl.sum(qg[:, None, :] * pos[None, :, :], 2)  # [BX, BP]
            for m in range(GK):
                logit = spatial
                if HAS_GROUP:
                    jx = tl.load(GIDX + (v * GQ + g) * GK + m)
                    grow = tl.load(GRP + jx * DG + (c - DPOS), mask=grp_ch, other=0.0)
                    logit = logit + tl.sum(qg * grow[None, :], 1)[:, None]
                kk = tl.load(K + (nb[:, :, None] * GK + m) * D + c[None, None, :],
                             mask=inside[:, :, None] & (c[None, None, :] < D), other=0.0)  # [BX, BP, BD]
                logit = tl.where(inside, logit + tl.sum(qg[:, None, :] * kk, 2), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(logit, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(logit - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if DROPOUT:
                    keep = _keep(seed, xs[:, None], v, g, m, d[None, :], GV, GQ, GK, P2, p_drop)
                    p = tl.where(keep, p * keep_scale, 0.0)
                vv = tl.load(V + (nb[:, :, None] * GK + m) * DV + cv[None, None, :],
                             mask=inside[:, :, None] & (cv[None, None, :] < DV), other=0.0)  # [BX, BP, BDV]
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv, 1)
                m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # (0 only for the padding pixels beyond n_pix)
        out += acc / l_safe[:, None]
        tl.store(LSE + (xs * GV + v) * GQ + g, m_i + tl.log(l_safe), mask=xmask)
    tl.store(OUT + (xs[:, None] * GV + v) * DV + cv[None, :], out, mask=xmask[:, None] & (cv[None, :] < DV))


@triton.jit
def _bwd_query(Q, K, V, POS, GRP, GIDX, LSE, GO, DQ, DELTA, DPOS_PART, DGRP_PART, n_pix, n_blocks, H, W, scale,
               p_drop, keep_scale, seed,
               GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               DPOS: tl.constexpr, DG: tl.constexpr, J: tl.constexpr, P: tl.constexpr, BX: tl.constexpr,
               BP: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, HAS_GROUP: tl.constexpr,
               DROPOUT: tl.constexpr):
    P2: tl.constexpr = P * P
    R: tl.constexpr = P // 2
    prog = tl.program_id(0)
    c = tl.arange(0, BD)
    cv = tl.arange(0, BDV)
    grp_ch = (c >= DPOS) & (c < DPOS + DG)
    # this program's slots of the table-gradient partial sums (it alone writes them)
    dpos_slot = DPOS_PART + prog * (GV * P2 * DPOS)
    dgrp_slot = DGRP_PART + prog * (J * DG)
    for blk in range(prog, n_blocks, tl.num_programs(0)):
        xs = blk * BX + tl.arange(0, BX)
        xmask = xs < n_pix
        i = (xs // W) % H
        j = xs % W
        n = xs // (H * W)
        q_ok = xmask[:, None] & (c[None, :] < D)
        for g in range(GQ):
            q_raw = tl.load(Q + (xs[:, None] * GQ + g) * D + c[None, :], mask=q_ok, other=0.0)  # [BX, BD]
            qg = q_raw * scale
            dq = tl.zeros([BX, BD], dtype=qg.dtype)
            for v in range(GV):
                lse = tl.load(LSE + (xs * GV + v) * GQ + g, mask=xmask, other=0.0)
                go = tl.load(GO + (xs[:, None] * GV + v) * DV + cv[None, :],
                             mask=xmask[:, None] & (cv[None, :] < DV), other=0.0)  # [BX, BDV]
                # two passes over the row: delta = sum p * dP first, then dL = p * (dP - delta)
                delta = tl.zeros([BX], dtype=qg.dtype)
                for sweep in tl.static_range(2):
                    for d0 in range(0, P2, BP):
                        d = d0 + tl.arange(0, BP)
                        ni = i[:, None] + d[None, :] // P - R
                        nj = j[:, None] + d[None, :] % P - R
                        inside = xmask[:, None] & (d[None, :] < P2) & (ni >= 0) & (ni < H) & (nj >= 0) & (nj < W)
                        nb = (n[:, None] * H + ni) * W + nj
                        pos = tl.load(POS + (v * P2 + d[:, None]) * DPOS + c[None, :],
                                      mask=(d[:, None] < P2) & (c[None, :] < DPOS), other=0.0)  # [BP, BD]
                        spatial = tl.sum(qg[:, None, :] * pos[None, :, :], 2)
                        dspatial = tl.zeros([BX, BP], dtype=qg.dtype)
                        delta_part = tl.zeros([BX], dtype=qg.dtype)
                        for m in range(GK):
                            logit = spatial
                            if HAS_GROUP:
                                jx = tl.load(GIDX + (v * GQ + g) * GK + m)
                                grow = tl.load(GRP + jx * DG + (c - DPOS), mask=grp_ch, other=0.0)
                                logit = logit + tl.sum(qg * grow[None, :], 1)[:, None]
                            kk = tl.load(K + (nb[:, :, None] * GK + m) * D + c[None, None, :],
                                         mask=inside[:, :, None] & (c[None, None, :] < D), other=0.0)
                            logit = logit + tl.sum(qg[:, None, :] * kk, 2)
                            p = tl.where(inside, tl.exp(logit - lse[:, None]), 0.0)
                            vv = tl.load(V + (nb[:, :, None] * GK + m) * DV + cv[None, None, :],
                                         mask=inside[:, :, None] & (cv[None, None, :] < DV), other=0.0)
                            dp = tl.sum(go[:, None, :] * vv, 2)  # d loss / d (kept, scaled) probability
                            if DROPOUT:
                                keep = _keep(seed, xs[:, None], v, g, m, d[None, :], GV, GQ, GK, P2, p_drop)
                                dp = tl.where(keep, dp * keep_scale, 0.0)
                            if sweep == 0:
                                delta_part += tl.sum(p * dp, 1)
                            else:
                                dl = p * (dp - delta[:, None]) * scale  # d loss / d (q . key~) of the row
                                dq += tl.sum(dl[:, :, None] * kk, 1)
                                dspatial += dl
                                if HAS_GROUP:
                                    da = tl.sum(dl, 1)  # [BX]
                                    dq += da[:, None] * grow[None, :]
                                    tl.atomic_add(dgrp_slot + jx * DG + (c - DPOS), tl.sum(da[:, None] * q_raw, 0),
                                                  mask=grp_ch)
                        if sweep == 0:
                            delta += delta_part
                        else:
                            dq += tl.sum(dspatial[:, :, None] * pos[None, :, :], 1)
                            tl.atomic_add(dpos_slot + (v * P2 + d[:, None]) * DPOS + c[None, :],
                                          tl.sum(dspatial[:, :, None] * q_raw[:, None, :], 0),
                                          mask=(d[:, None] < P2) & (c[None, :] < DPOS))
                tl.store(DELTA + (xs * GV + v) * GQ + g, delta, mask=xmask)
            tl.store(DQ + (xs[:, None] * GQ + g) * D + c[None, :], dq, mask=q_ok)


@triton.jit
def _bwd_key(Q, K, V, POS, GRP, GIDX, LSE, GO, DELTA, DK, DV_, n_pix, H, W, scale, p_drop, keep_scale, seed,
             GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
             DPOS: tl.constexpr, DG: tl.constexpr, P: tl.constexpr, BX: tl.constexpr, BP: tl.constexpr,
             BD: tl.constexpr, BDV: tl.constexpr, HAS_GROUP: tl.constexpr, DROPOUT: tl.constexpr):
    P2: tl.constexpr = P * P
    R: tl.constexpr = P // 2
    m = tl.program_id(1)
    ys = tl.program_id(0) * BX + tl.arange(0, BX)
    ymask = ys < n_pix
    i = (ys // W) % H
    j = ys % W
    n = ys // (H * W)
    c = tl.arange(0, BD)
    cv = tl.arange(0, BDV)
    grp_ch = (c >= DPOS) & (c < DPOS + DG)
    kk = tl.load(K + (ys[:, None] * GK + m) * D + c[None, :], mask=ymask[:, None] & (c[None, :] < D), other=0.0)
    vy = tl.load(V + (ys[:, None] * GK + m) * DV + cv[None, :], mask=ymask[:, None] & (cv[None, :] < DV), other=0.0)
    dk = tl.zeros([BX, BD], dtype=kk.dtype)
    dv = tl.zeros([BX, BDV], dtype=kk.dtype)
    for d0 in range(0, P2, BP):
        d = d0 + tl.arange(0, BP)
        xi = i[:, None] - d[None, :] // P + R  # the query pixel x whose offset d lands on y
        xj = j[:, None] - d[None, :] % P + R
        seen = ymask[:, None] & (d[None, :] < P2) & (xi >= 0) & (xi < H) & (xj >= 0) & (xj < W)
        xs = (n[:, None] * H + xi) * W + xj  # [BX, BP]
        for v in range(GV):
            pos = tl.load(POS + (v * P2 + d[:, None]) * DPOS + c[None, :],
                          mask=(d[:, None] < P2) & (c[None, :] < DPOS), other=0.0)  # [BP, BD]
            go = tl.load(GO + (xs[:, :, None] * GV + v) * DV + cv[None, None, :],
                         mask=seen[:, :, None] & (cv[None, None, :] < DV), other=0.0)  # [BX, BP, BDV]
            dp = tl.sum(go * vy[:, None, :], 2)  # [BX, BP]
            for g in range(GQ):
                q_raw = tl.load(Q + (xs[:, :, None] * GQ + g) * D + c[None, None, :],
                                mask=seen[:, :, None] & (c[None, None, :] < D), other=0.0)  # [BX, BP, BD]
                key = kk[:, None, :] + pos[None, :, :]
                if HAS_GROUP:
                    jx = tl.load(GIDX + (v * GQ + g) * GK + m)
                    grow = tl.load(GRP + jx * DG + (c - DPOS), mask=grp_ch, other=0.0)
                    key = key + grow[None, None, :]
                logit = tl.sum(q_raw * key, 2) * scale
                lse = tl.load(LSE + (xs * GV + v) * GQ + g, mask=seen, other=0.0)
                delta = tl.load(DELTA + (xs * GV + v) * GQ + g, mask=seen, other=0.0)
                p = tl.where(seen, tl.exp(logit - lse), 0.0)
                kept = p
                if DROPOUT:
                    keep = _keep(seed, xs, v, g, m, d[None, :], GV, GQ, GK, P2, p_drop)
                    kept = tl.where(keep, p * keep_scale, 0.0)
                dl = (kept * dp - p * delta) * scale
                dk += tl.sum(dl[:, :, None] * q_raw, 1)
                dv += tl.sum(kept[:, :, None] * go, 1)
    tl.store(DK + (ys[:, None] * GK + m) * D + c[None, :], dk, mask=ymask[:, None] & (c[None, :] < D))
    tl.store(DV_ + (ys[:, None] * GK + m) * DV + cv[None, :], dv, mask=ymask[:, None] & (cv[None, :] < DV))


@triton.jit
def keep_mask_kernel(MASK, total, seed, p_drop, GV: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr,
                     P2: tl.constexpr, BLOCK: tl.constexpr):
    """MASK[x, v, g, m, d] = the dropout decision of score (x, v, g, m, d) (debugging and tests)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    d = idx % P2
    m = (idx // P2) % GK
    g = (idx // (P2 * GK)) % GQ
    v = (idx // (P2 * GK * GQ)) % GV
    x = idx // (P2 * GK * GQ * GV)
    tl.store(MASK + idx, _keep(seed, x, v, g, m, d, GV, GQ, GK, P2, p_drop).to(tl.int8), mask=ok)
