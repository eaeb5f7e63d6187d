"""Lifting and group self-attention of GE-ViT / GSA-Nets, written the way the math reads.

Every pixel attends to a P x P neighbourhood (global attention: the whole image) and, in a group layer, to every
group element there. Per head, with 1x1 linear maps ``q``, ``k``, ``val`` of the input, a query at pixel x and group
element g looks at the key at pixel x + delta and group element m. For every *output* group element v:

    L[v, g, x, m, delta] = s * (   q(g, x) . k(m, x + delta)                              content
                                 + q_row(g, x) . e_row(row of A_v delta)                   row position
                                 + q_col(g, x) . e_col(column of A_v delta)                column position
                                 + q_grp(g, x) . e_grp[gidx[v, g, m]] )                    group position

- ``A_v delta`` is the offset moved by v (rotated, maybe mirrored): the only place where v enters the spatial terms;
  ``e_row``, ``e_col`` are small MLPs of one scalar coordinate (:mod:`gevit_lib.nn.positional`).
- ``e_grp`` is a table of |G| learned vectors; ``gidx[v, g, m]`` picks one for (query g, key m) and output v
  (:func:`gevit_lib.nn.positional.group_index_table`; docs/group_table.md explains the choice).
- ``q_row``, ``q_col``, ``q_grp`` are consecutive slices of the query channels; ``s = 1 / sqrt(C_in)`` (input
  channels of the layer, not the head size, as in the original code). Neighbours outside the image get ``L = -inf``.

The probabilities are a softmax over (m, delta) *jointly*, separately for every (v, g, x), and the output at v sums
the attended values of *all* query group elements g:

    p[v, g, x, m, delta] = exp(L[v, g, x, m, delta]) / sum over (m', delta') of exp(L[v, g, x, m', delta'])
    out(v, x) = sum over g of   sum over (m, delta) of   p[v, g, x, m, delta] * val(m, x + delta)

Lifting self-attention is the special case of an image input: one query and one key "group element", no group
term; the output still has a group axis, because every v sees the neighbourhood through its own moved offsets.
Global attention lets delta range over all key pixels (offsets from a (2S-1) x (2S-1) table for an S x S image).

Index letters (the einsum subscripts below) and the tensor sizes they run over:

    b     batch x heads          N = B * n (B images, n heads; channel-major: channel c * n + head, as in the original)
    c     channel within a head  d (``mid_channels``; q/k split into row, column and group slices)
    v     output group element   Gv = |G|
    g     query group element    Gq = |G| (1 in the lifting layer)
    m     key group element      Gk = |G| (1 in the lifting layer)
    i, j  query pixel row, col   H, W
    k, l  neighbour row, col     P, P (offset k - P//2, l - P//2); global attention: key pixel row, col (H, W)

``impl="plain"`` is :func:`reference_attention`, the formula in einsum with the full logit tensor
``[b, v, g, i, j, m, k, l]`` (for tests and reading); ``impl="fast"`` (default) is
:func:`gevit_lib.nn.fast_attention.fast_local_attention`, the same function without that tensor (global attention
as local attention with a (2S-1) x (2S-1) neighbourhood), tested against the plain path, values and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..groups import Group, get_group
from .fast_attention import fast_local_attention, packed_local_attention
from .positional import RelativePositionalEncoding, feature_action_side

__all__ = ["IMPLS", "check_impl", "Pointwise", "reference_logits", "reference_attention", "local_attention",
           "global_attention", "LiftingSelfAttention", "GroupSelfAttention"]

IMPLS: tuple[str, ...] = ("fast", "plain")


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation ("fast" or "plain"; also of the G-CNN layers), else a ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class Pointwise(nn.Module):
    """A 1x1 convolution as a linear map of the channel axis (dim 1) of ``[B, C, ...]`` (weight ``[out, in]``)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / in_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}"


# ---- the plain path: the formula, one einsum per term ------------------------------------------------------------
def _neighbourhoods(x: Tensor, p: int) -> Tensor:
    """The P x P neighbours of every pixel (zeros outside the image): ``[b, c, m, i, j] -> [b, c, m, k, l, i, j]``."""
    n, d, gk, h, w = x.shape
    cols = F.unfold(rearrange(x, "b c m i j -> b (c m) i j"), p, padding=p // 2)  # [b, (c m k l), (i j)]
    return cols.view(n, d, gk, p, p, h, w)  # [b, c, m, k, l, i, j]


def reference_logits(q: Tensor, k: Tensor, pos: Tensor, grp: Tensor | None = None, gidx: Tensor | None = None, *,
                     scale: float, patch_size: int | None) -> Tensor:
    """The logits ``L`` of the module docstring, materialised: ``[b, v, g, i, j, m, k, l]``.

    q ``[b, i, j, g, c]``, k ``[b, i, j, m, c]``; pos ``[v, k*l, dpos]`` (row and column embeddings of the moved
    offsets, used with ``q[..., :dpos]``); grp ``[|G|, dg]`` and gidx ``[v, g, m]`` (group term, used with
    ``q[..., dpos:dpos+dg]``; None for lifting). ``patch_size`` None: global attention over all (2S-1)^2 offsets.
    """
    n, h, w, gq, d = q.shape
    gk, n_gv, dpos = k.shape[3], pos.shape[0], pos.shape[-1]
    qo = rearrange(q, "b i j g c -> b c g i j")
    ko = rearrange(k, "b i j m c -> b c m i j")
    if patch_size is not None:
        p = patch_size
        content = torch.einsum("bcgij,bcmklij->bgijmkl", qo, _neighbourhoods(ko, p)).unsqueeze(1)  # [b,1,g,i,j,m,k,l]
        table = pos.view(n_gv, p, p, dpos)  # [v, k, l, c]
        spatial = torch.einsum("bcgij,vklc->bvgijkl", qo[:, :dpos], table)
    else:
        if h != w:
            raise ValueError(f"global attention needs a square image, got {h}x{w}")
        content = torch.einsum("bcgij,bcmkl->bgijmkl", qo, ko).unsqueeze(1)  # [b, 1, g, i, j, m, k, l]
        s = h
        table = pos.view(n_gv, 2 * s - 1, 2 * s - 1, dpos)  # [v, row offset, column offset, c]
        # for query (i, j) and key (k, l) the offset is (k - i, l - j): table row k - i + S - 1, column l - j + S - 1
        rel = torch.arange(s).view(1, -1) - torch.arange(s).view(-1, 1) + s - 1  # [query, key]
        windows = table[:, rel.view(s, 1, s, 1), rel.view(1, s, 1, s)]  # [v, i, j, k, l, c]
        spatial = torch.einsum("bcgij,vijklc->bvgijkl", qo[:, :dpos], windows)
    scores = spatial.unsqueeze(-3)  # [b, v, g, i, j, 1, k, l]: the same for every key group element m
    if grp is not None and gidx is not None:
        dg = grp.shape[1]
        g_emb = grp[gidx.reshape(-1)].view(*gidx.shape, dg)  # [v, g, m, c]: e_grp[gidx[v, g, m]]
        g_scores = torch.einsum("bcgij,vgmc->bvgijm", qo[:, dpos:dpos + dg], g_emb)
        scores = scores + g_scores[..., None, None]  # [b, v, g, i, j, m, 1, 1]: the same for every offset
    scores = (scores + content.expand_as(scores)) * scale  # [b, v, g, i, j, m, k, l]
    if patch_size is not None:
        p = patch_size
        ones = torch.ones(1, 1, h, w, dtype=q.dtype, device=q.device)
        inside = F.unfold(ones, p, padding=p // 2).view(p, p, h, w)  # [k, l, i, j]: 1 where the neighbour exists
        outside = torch.zeros_like(inside).masked_fill_(inside == 0, float("inf"))
        scores = scores - outside.permute(2, 3, 0, 1)[:, :, None]  # [i, j, 1, k, l]
    return scores


def _joint_softmax(scores: Tensor) -> Tensor:
    """Softmax of ``[..., m, k, l]`` over (m, k, l) together."""
    return torch.softmax(scores.flatten(-3), -1).view(scores.shape)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None = None,
                        gidx: Tensor | None = None, *, scale: float, patch_size: int | None, dropout: float = 0.0,
                        training: bool = False) -> Tensor:
    """Lifting / group self-attention by the formula (the ``"plain"`` path): ``[b, i, j, v, c]``.

    Arguments as in :func:`reference_logits`, v ``[b, i, j, m, c]``; attention dropout when ``training``."""
    scores = reference_logits(q, k, pos, grp, gidx, scale=scale, patch_size=patch_size)  # [b, v, g, i, j, m, k, l]
    probs = F.dropout(_joint_softmax(scores), dropout, training)  # softmax over (m, k, l) together
    vo = rearrange(v, "b i j m c -> b c m i j")
    if patch_size is not None:
        out = torch.einsum("bvgijmkl,bcmklij->bcvij", probs, _neighbourhoods(vo, patch_size))
    else:
        out = torch.einsum("bvgijmkl,bcmkl->bcvij", probs, vo)
    return rearrange(out, "b c v i j -> b i j v c")


def local_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None = None,
                    gidx: Tensor | None = None, *, scale: float, patch_size: int | None, dropout: float = 0.0,
                    training: bool = False, impl: str = "fast") -> Tensor:
    """Lifting/group self-attention on projected heads by ``impl`` ("fast" or "plain"): ``[N, H, W, Gv, dv]``.
    Layouts as in :func:`reference_logits` (N = batch * heads); ``patch_size`` None: global attention."""
    if check_impl(impl) == "plain":
        return reference_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=patch_size, dropout=dropout,
                                   training=training)
    patch = 2 * q.shape[1] - 1 if patch_size is None else patch_size  # global: every offset of an S x S image
    return fast_local_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=patch,
                                dropout=dropout if training else 0.0)


def global_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None = None,
                     gidx: Tensor | None = None, *, scale: float, dropout: float = 0.0, training: bool = False,
                     impl: str = "fast") -> Tensor:
    """Global attention on an S x S image; ``pos`` holds the embeddings of all (2S-1)^2 relative offsets."""
    return local_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=None, dropout=dropout, training=training,
                           impl=impl)


# ---- layers ----------------------------------------------------------------------------------------------------
class _SelfAttention(nn.Module):
    """Shared parts of the lifting and group layers: projections, positional encoding, head bookkeeping."""

    lifting: bool = False

    def __init__(self, group: Group | str, in_channels: int, out_channels: int, num_heads: int,
                 mid_channels: int | None = None, patch_size: int | None = 5, image_size: int | None = None,
                 attention_dropout: float = 0.0, positional: str = "gevit", group_index: str = "corrected",
                 impl: str = "fast") -> None:
        super().__init__()
        self.group = get_group(group)
        mid = out_channels // 2 if mid_channels is None else mid_channels
        if min(in_channels, out_channels, num_heads, mid) < 1:
            raise ValueError(f"channels and heads must be positive, got in={in_channels}, out={out_channels}, "
                             f"heads={num_heads}, mid={mid}")
        if patch_size is None and image_size is None:
            raise ValueError("give patch_size (local attention) or image_size (global attention)")
        if patch_size is not None and (patch_size < 3 or patch_size % 2 == 0):
            raise ValueError(f"patch_size must be an odd number >= 3, got {patch_size}")
        if patch_size is None and image_size is not None and image_size < 2:
            raise ValueError(f"global attention needs image_size >= 2, got {image_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads, self.mid_channels = num_heads, mid
        self.patch_size, self.image_size = patch_size, (None if patch_size is not None else image_size)
        self.attention_dropout = attention_dropout
        self.impl = check_impl(impl)
        if self.lifting:
            if mid % 2:
                raise ValueError(f"the lifting layer splits its {mid} query channels into row and column halves: "
                                 "mid_channels must be even")
            pos_dim, group_dim = mid // 2, 0
        else:
            pos_dim, group_dim = mid // 3, mid - 2 * (mid // 3)
            if pos_dim < 1:
                raise ValueError(f"group self-attention needs mid_channels >= 3, got {mid}")
        size = patch_size if patch_size is not None else 2 * image_size - 1  # type: ignore[operator]
        self.pos = RelativePositionalEncoding(self.group, size, pos_dim, group_dim, positional, group_index)
        self.query, self.key, self.value = (Pointwise(in_channels, mid * num_heads) for _ in range(3))
        self.out = Pointwise(mid * num_heads, out_channels)

    @property
    def positional(self) -> str:
        return self.pos.positional

    @property
    def feature_side(self) -> str:
        """Regular action of the output's group axis: "right" (GE-ViT) or "left" (GSA-Nets)."""
        return feature_action_side(self.positional)

    def _packed_heads(self, x_cl: Tensor) -> Tensor:
        """Queries, keys, values of ``x_cl [B, H, W, G, C_in]`` in one tensor ``[B, H, W, G, 3, d, heads]``.
        The fast path keeps them channels-first in memory (``[B, 3 * d * heads, G, H, W]``, see :meth:`_merge`)."""
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])  # type: ignore[list-item]
        if self.impl == "fast":
            x_cf = x_cl.permute(0, 4, 3, 1, 2)  # [B, C_in, G, H, W]
            qkv = torch.baddbmm(b[:, None], w.expand(len(x_cf), -1, -1), x_cf.flatten(2))  # [B, 3*d*heads, G*H*W]
            qkv = rearrange(qkv.view(*qkv.shape[:2], *x_cf.shape[2:]), "B c g i j -> B i j g c")  # (a view)
        else:
            qkv = F.linear(x_cl, w, b)  # [B, H, W, G, 3 * d * heads]
        # heads are channel-major (channel c * heads + h): the last axis is (qkv, c, head)
        return rearrange(qkv, "B i j g (t c n) -> B i j g t c n", t=3, n=self.num_heads)

    def _heads(self, x_cl: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values of ``x_cl [B, H, W, G, C_in]``, each ``[B*heads, H, W, G, d]``."""
        qkv = rearrange(self._packed_heads(x_cl), "B i j g t c n -> t (B n) i j g c")
        q, k, v = qkv.unbind(0)  # (its backward writes the three gradients into one tensor; indexing would add three)
        return q, k, v

    def _merge(self, out: Tensor) -> Tensor:
        """Heads ``[B, H, W, G, d, heads]`` back to channels (channel-major), then the output ``[B, C_out, G, H, W]``.
        The fast path multiplies channels-first (the kernel's output is channels-first when its input is): one
        matrix product per image over all its pixels, with no transposed copies of the activations on either side."""
        if self.impl == "fast":
            heads_cf = rearrange(out, "B i j g c n -> B (c n) (g i j)")  # a view of the kernel's output
            y = torch.baddbmm(self.out.bias[:, None], self.out.weight.expand(len(out), -1, -1), heads_cf)
            b, h, w, g = out.shape[:4]
            return y.view(b, -1, g, h, w)  # [B, C_out, G, H, W]
        out = F.linear(out.flatten(-2), self.out.weight, self.out.bias)  # [B, H, W, G, C_out]
        return rearrange(out, "B i j g c -> B c g i j")

    def _group_term(self) -> tuple[Tensor | None, Tensor | None]:
        if self.pos.group_embedding is None:
            return None, None
        return self.pos.group_embedding.weight, self.pos.group_index

    def _channels_last(self, x: Tensor) -> Tensor:
        """Check the input and return it as ``[B, H, W, G, C_in]`` (G = 1 for the lifting layer)."""
        name, g = type(self).__name__, len(self.group)
        if self.lifting and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"{name} expects images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if not self.lifting and (x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[2] != g):
            raise ValueError(f"{name} expects group signals [B, {self.in_channels}, {g}, H, W] (group "
                             f"{self.group.name}), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.group.n_rotations > 1 and h != w:
            raise ValueError(f"{name} with rotation group {self.group.name} needs square images, got {h}x{w}")
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"global {name} was built for {self.image_size}x{self.image_size} inputs, got {h}x{w}")
        return x.permute(0, 2, 3, 1).unsqueeze(3) if self.lifting else x.permute(0, 3, 4, 2, 1)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[B, C_out, G, H, W]``; with ``return_attention=True`` also the attention probabilities of the plain
        path (before dropout, no gradient), as :meth:`attention_probabilities` gives them."""
        x_cl, (grp, gidx) = self._channels_last(x), self._group_term()
        scale, dropout = 1.0 / math.sqrt(self.in_channels), self.attention_dropout if self.training else 0.0
        if self.impl == "fast":  # the heads stay packed: the CPU kernel reads them in place
            patch = self.patch_size or 2 * x.shape[-1] - 1  # global: every offset of an S x S image
            out = packed_local_attention(self._packed_heads(x_cl), self.pos.spatial(), grp, gidx, scale=scale,
                                         patch_size=patch, dropout=dropout)  # [B, H, W, G, d, heads]
        else:
            q, k, v = self._heads(x_cl)  # [B * heads, H, W, G, d] each
            out = reference_attention(q, k, v, self.pos.spatial(), grp, gidx, scale=scale, patch_size=self.patch_size,
                                      dropout=dropout, training=self.training)
            out = rearrange(out, "(B n) i j g c -> B i j g c n", B=x.shape[0])
        out = self._merge(out)
        return (out, self.attention_probabilities(x)) if return_attention else out

    @torch.no_grad()
    def attention_probabilities(self, x: Tensor) -> Tensor:
        """Softmax probabilities (no dropout), ``[B, heads, G(v), G(g), H, W, G(m), P, P]`` (global: ``..., H, W``)."""
        q, k, _ = self._heads(self._channels_last(x))
        grp, gidx = self._group_term()
        scores = reference_logits(q, k, self.pos.spatial(), grp, gidx, scale=1.0 / math.sqrt(self.in_channels),
                                  patch_size=self.patch_size)  # [B*heads, v, g, i, j, m, k, l]
        return _joint_softmax(scores).view(x.shape[0], self.num_heads, *scores.shape[1:])  # [B, heads, v, g, ...]

    def extra_repr(self) -> str:
        hood = f"patch_size={self.patch_size}" if self.patch_size else f"global, image_size={self.image_size}"
        return (f"group={self.group.name}, in={self.in_channels}, out={self.out_channels}, heads={self.num_heads}, "
                f"mid={self.mid_channels}, {hood}, impl={self.impl!r}")


class LiftingSelfAttention(_SelfAttention):
    """Lifting self-attention: image ``[B, C_in, H, W]`` -> group signal ``[B, C_out, G, H, W]`` (formula: module
    docstring). Row/column embeddings use ``mid_channels // 2`` query channels each (mid_channels must be even)."""

    lifting = True

    def __init__(self, group: Group | str, in_channels: int, out_channels: int, num_heads: int,
                 mid_channels: int | None = None, patch_size: int | None = 5, image_size: int | None = None,
                 attention_dropout: float = 0.0, positional: str = "gevit", impl: str = "fast") -> None:
        super().__init__(group, in_channels, out_channels, num_heads, mid_channels, patch_size, image_size,
                         attention_dropout, positional, "corrected", impl)

    @torch.no_grad()
    def attention_probabilities(self, x: Tensor) -> Tensor:
        """Softmax probabilities (no dropout), ``[B, heads, G, H, W, P, P]`` (global: ``[B, heads, G, H, W, H, W]``);
        the last two axes are (row offset + P//2, column offset + P//2); 0 outside the image."""
        return super().attention_probabilities(x)[:, :, :, 0, :, :, 0]  # drop the query and key group axes (size 1)


class GroupSelfAttention(_SelfAttention):
    """Group self-attention: ``[B, C_in, G, H, W]`` -> ``[B, C_out, G, H, W]`` (formula: module docstring).

    Query channels: ``mid // 3`` row, ``mid // 3`` column, the rest group embedding. ``group_index`` selects the
    group-axis table ("corrected": exactly equivariant; "reference": the original code's).
    """
