"""Lifting and group self-attention layers of GE-ViT / GSA-Nets (local P x P neighbourhoods or global).

One attention function, two implementations (``impl=``):

- ``"plain"`` transcribes the original computation (SPEC 2.2-2.4): it materialises the full logit tensor
  ``[B, heads, G(v), G(g), H, W, G(m), P, P]`` (global: ``[..., G(m), H, W]``) from the content, row, column and
  group terms, masks outside-image neighbours with -inf, takes the softmax jointly over (m, neighbourhood), applies
  dropout and sums ``prob * value`` over (g, m, neighbourhood). Kept for tests and teaching; memory ~ G^3 H W P^2.
- ``"fast"`` (default): :mod:`gevit_lib.nn.fast_attention`, the same function without the 9-D tensor (on CPU a
  fused C++ kernel, elsewhere chunk by chunk in torch) with a recomputing backward pass; global attention runs as local attention with a (2S-1) x (2S-1) neighbourhood, which
  has exactly the same normalised relative offsets.

The lifting layer is the special case with one query/key group element and no group term, so both layers share
the implementation. Heads are laid out channel-major as in the original (channel ``c * heads + h``), the score
normaliser is ``sqrt(in_channels)``, and projections are 1x1 linear maps (``weight [out, in]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import Group, get_group
from .fast_attention import fast_local_attention
from .positional import RelativePositionalEncoding, feature_action_side

__all__ = [
    "IMPLS",
    "Pointwise",
    "local_attention",
    "global_attention",
    "LiftingSelfAttention",
    "GroupSelfAttention",
]

IMPLS: tuple[str, ...] = ("fast", "plain")


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


# ---- the attention function ------------------------------------------------------------------------------------
def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _plain_scores(q: Tensor, k: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None, scale: float,
                  patch_size: int | None) -> Tensor:
    """The materialised logits, original layout ``[N, Gv, Gq, H, W, Gk, *neighbourhood]`` (N = batch * heads).

    ``patch_size`` None means global attention: neighbourhood = the whole image, ``pos`` on the (2S-1)^2 offsets.
    """
    n, h, w, gq, d = q.shape
    gk, n_gv, dpos = k.shape[3], pos.shape[0], pos.shape[-1]
    qo = q.permute(0, 4, 3, 1, 2)  # [N, d, Gq, H, W] as in the original
    ko = k.permute(0, 4, 3, 1, 2)
    if patch_size is not None:
        p = patch_size
        k_local = F.unfold(ko.reshape(n, d * gk, h, w), p, padding=p // 2).view(n, d, gk, p, p, h, w)
        content = torch.einsum("bcgij,bcmklij->bgijmkl", qo, k_local).unsqueeze(1)
        table = pos.view(n_gv, p, p, dpos)
        spatial = torch.einsum("bcgij,vklc->bvgijkl", qo[:, :dpos], table)
    else:
        if h != w:
            raise ValueError(f"global attention needs a square image, got {h}x{w}")
        content = torch.einsum("bcgij,bcmkl->bgijmkl", qo, ko).unsqueeze(1)
        s = h
        table = pos.view(n_gv, 2 * s - 1, 2 * s - 1, dpos)
        # window of relative offsets (key - query) for every query position, as the original's extract_patches
        rel = torch.arange(s).view(1, -1) - torch.arange(s).view(-1, 1) + s - 1  # [query, key]
        windows = table[:, rel.view(s, 1, s, 1), rel.view(1, s, 1, s)]  # [G, i, j, k, l, c]
        spatial = torch.einsum("bcgij,vijklc->bvgijkl", qo[:, :dpos], windows)
    scores = spatial.unsqueeze(-3)  # broadcast over m
    if grp is not None and gidx is not None:
        dg = grp.shape[1]
        g_emb = grp[gidx.reshape(-1)].view(*gidx.shape, dg)  # [v, g, m, c]
        g_scores = torch.einsum("bcgij,vgmc->bvgijm", qo[:, dpos:dpos + dg], g_emb)
        scores = scores + g_scores[..., None, None]
    scores = (scores + content.expand_as(scores)) * scale
    if patch_size is not None:
        p = patch_size
        inside = F.unfold(torch.ones(1, 1, h, w, dtype=q.dtype, device=q.device), p, padding=p // 2).view(p, p, h, w)
        outside = torch.zeros_like(inside).masked_fill_(inside == 0, float("inf"))
        scores = scores - outside.permute(2, 3, 0, 1)[:, :, None]  # [H, W, 1, P, P]
    return scores


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None, gidx: Tensor | None, *,
                     scale: float, patch_size: int | None, dropout: float, training: bool) -> Tensor:
    n, h, w, gq, _ = q.shape
    gk, dv = k.shape[3], v.shape[4]
    scores = _plain_scores(q, k, pos, grp, gidx, scale, patch_size)
    shape = scores.shape
    probs = F.dropout(torch.softmax(scores.reshape(*shape[:-3], -1), -1).view(shape), dropout, training)
    vo = v.permute(0, 4, 3, 1, 2)  # [N, dv, Gk, H, W]
    if patch_size is not None:
        p = patch_size
        v_local = F.unfold(vo.reshape(n, dv * gk, h, w), p, padding=p // 2).view(n, dv, gk, p, p, h, w)
        out = torch.einsum("bvgijmkl,bcmklij->bcvij", probs, v_local)
    else:
        out = torch.einsum("bvgijmkl,bcmkl->bcvij", probs, vo)
    return out.permute(0, 3, 4, 2, 1)  # [N, H, W, Gv, dv]


def local_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None = None,
                    gidx: Tensor | None = None, *, scale: float, patch_size: int, dropout: float = 0.0,
                    training: bool = False, impl: str = "fast", chunk_elements: int | None = None) -> Tensor:
    """Local lifting/group self-attention on projected heads.

    q ``[N, H, W, Gq, d]``, k ``[N, H, W, Gk, d]``, v ``[N, H, W, Gk, dv]`` (N = batch * heads), pos
    ``[Gv, P*P, dpos]`` (row/column embeddings of the transformed offsets, used with ``q[..., :dpos]``), grp
    ``[G, dg]`` and gidx ``[Gv, Gq, Gk]`` (group term, used with ``q[..., dpos:dpos+dg]``; None for lifting).
    Returns ``[N, H, W, Gv, dv]``.
    """
    p_drop = dropout if training else 0.0
    if _check_impl(impl) == "plain":
        return _plain_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=patch_size, dropout=dropout,
                                training=training)
    return fast_local_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=patch_size, dropout=p_drop,
                                chunk_elements=chunk_elements)


def global_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, grp: Tensor | None = None,
                     gidx: Tensor | None = None, *, scale: float, dropout: float = 0.0, training: bool = False,
                     impl: str = "fast", chunk_elements: int | None = None) -> Tensor:
    """Global attention on an S x S image; ``pos`` holds the embeddings of all (2S-1)^2 relative offsets."""
    s = q.shape[1]
    if _check_impl(impl) == "plain":
        return _plain_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=None, dropout=dropout,
                                training=training)
    return fast_local_attention(q, k, v, pos, grp, gidx, scale=scale, patch_size=2 * s - 1,
                                dropout=dropout if training else 0.0, chunk_elements=chunk_elements)


# ---- layers ----------------------------------------------------------------------------------------------------
class _SelfAttention(nn.Module):
    """Shared parts of the lifting and group layers: projections, positional encoding, head bookkeeping."""

    lifting: bool = False

    def __init__(self, group: Group | str, in_channels: int, out_channels: int, num_heads: int,
                 mid_channels: int | None, patch_size: int | None, image_size: int | None, attention_dropout: float,
                 positional: str, group_index: str, impl: str) -> None:
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
        self.impl = _check_impl(impl)
        self.chunk_elements: int | None = None
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
        self.query = Pointwise(in_channels, mid * num_heads)
        self.key = Pointwise(in_channels, mid * num_heads)
        self.value = Pointwise(in_channels, mid * num_heads)
        self.out = Pointwise(mid * num_heads, out_channels)

    @property
    def positional(self) -> str:
        return self.pos.positional

    @property
    def feature_side(self) -> str:
        """Regular action of the output's group axis: "right" (GE-ViT) or "left" (GSA-Nets)."""
        return feature_action_side(self.positional)

    # x_cl: [B, H, W, Gin, Cin] -> q, k, v [B*heads, H, W, Gin, d]
    def _heads(self, x_cl: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])  # type: ignore[list-item]
        qkv = F.linear(x_cl, w, b)
        bsz, h, wd, g = qkv.shape[:4]
        d, nh = self.mid_channels, self.num_heads
        qkv = qkv.view(bsz, h, wd, g, 3, d, nh).permute(4, 0, 6, 1, 2, 3, 5).reshape(3, bsz * nh, h, wd, g, d)
        return qkv[0], qkv[1], qkv[2]

    def _merge(self, out: Tensor, bsz: int) -> Tensor:
        n, h, w, g, d = out.shape
        out = out.view(bsz, self.num_heads, h, w, g, d).permute(0, 2, 3, 4, 5, 1)
        out = out.reshape(bsz, h, w, g, d * self.num_heads)
        return F.linear(out, self.out.weight, self.out.bias).permute(0, 4, 3, 1, 2)  # [B, C, G, H, W]

    def _group_term(self) -> tuple[Tensor | None, Tensor | None]:
        if self.pos.group_embedding is None:
            return None, None
        return self.pos.group_embedding.weight, self.pos.group_index

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        grp, gidx = self._group_term()
        scale = 1.0 / math.sqrt(self.in_channels)
        common = dict(scale=scale, dropout=self.attention_dropout, training=self.training, impl=self.impl,
                      chunk_elements=self.chunk_elements)
        if self.patch_size is not None:
            return local_attention(q, k, v, self.pos.spatial(), grp, gidx, patch_size=self.patch_size, **common)
        return global_attention(q, k, v, self.pos.spatial(), grp, gidx, **common)

    def _check_spatial(self, h: int, w: int) -> None:
        if self.group.n_rotations > 1 and h != w:
            raise ValueError(f"{type(self).__name__} with rotation group {self.group.name} needs square images, "
                             f"got {h}x{w}")
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"global {type(self).__name__} was built for {self.image_size}x{self.image_size} "
                             f"inputs, got {h}x{w}")

    def _probabilities(self, q: Tensor, k: Tensor, bsz: int) -> Tensor:
        grp, gidx = self._group_term()
        scores = _plain_scores(q, k, self.pos.spatial(), grp, gidx, 1.0 / math.sqrt(self.in_channels), self.patch_size)
        shape = scores.shape
        probs = torch.softmax(scores.reshape(*shape[:-3], -1), -1).view(shape)
        return probs.view(bsz, self.num_heads, *shape[1:])

    def extra_repr(self) -> str:
        hood = f"patch_size={self.patch_size}" if self.patch_size else f"global, image_size={self.image_size}"
        return (f"group={self.group.name}, in={self.in_channels}, out={self.out_channels}, heads={self.num_heads}, "
                f"mid={self.mid_channels}, {hood}, impl={self.impl!r}")


class LiftingSelfAttention(_SelfAttention):
    """Lifting self-attention: image ``[B, C_in, H, W]`` -> group signal ``[B, C_out, G, H, W]`` (SPEC 2.2, 2.4).

    Row/column embeddings use ``mid_channels // 2`` query channels each (mid_channels must be even).
    """

    lifting = True

    def __init__(self, group: Group | str, in_channels: int, out_channels: int, num_heads: int,
                 mid_channels: int | None = None, patch_size: int | None = 5, image_size: int | None = None,
                 attention_dropout: float = 0.0, positional: str = "gevit", impl: str = "fast") -> None:
        super().__init__(group, in_channels, out_channels, num_heads, mid_channels, patch_size, image_size,
                         attention_dropout, positional, "corrected", impl)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"LiftingSelfAttention expects images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        self._check_spatial(x.shape[-2], x.shape[-1])

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[B, C_out, G, H, W]``; with ``return_attention=True`` also the attention probabilities of the plain
        path (before dropout, no gradient), as :meth:`attention_probabilities` gives them."""
        self._check(x)
        q, k, v = self._heads(x.permute(0, 2, 3, 1).unsqueeze(3))
        out = self._merge(self._attend(q, k, v), x.shape[0])
        return (out, self.attention_probabilities(x)) if return_attention else out

    @torch.no_grad()
    def attention_probabilities(self, x: Tensor) -> Tensor:
        """Softmax probabilities (no dropout), ``[B, heads, G, H, W, P, P]`` (global: ``[B, heads, G, H, W, H, W]``);
        the last two axes are (row offset + P//2, column offset + P//2); 0 outside the image."""
        self._check(x)
        q, k, _ = self._heads(x.permute(0, 2, 3, 1).unsqueeze(3))
        probs = self._probabilities(q, k, x.shape[0])  # [B, nh, Gv, 1, H, W, 1, ., .]
        return probs[:, :, :, 0, :, :, 0]


class GroupSelfAttention(_SelfAttention):
    """Group self-attention: ``[B, C_in, G, H, W]`` -> ``[B, C_out, G, H, W]`` (SPEC 2.3, 2.4).

    Query channels: ``mid // 3`` row, ``mid // 3`` column, the rest group embedding. ``group_index`` selects the
    group-axis table ("corrected": exactly equivariant; "reference": the original code's).
    """

    def __init__(self, group: Group | str, in_channels: int, out_channels: int, num_heads: int,
                 mid_channels: int | None = None, patch_size: int | None = 5, image_size: int | None = None,
                 attention_dropout: float = 0.0, positional: str = "gevit", group_index: str = "corrected",
                 impl: str = "fast") -> None:
        super().__init__(group, in_channels, out_channels, num_heads, mid_channels, patch_size, image_size,
                         attention_dropout, positional, group_index, impl)

    @property
    def group_index(self) -> str:
        return self.pos.group_index_kind

    def _check(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[2] != len(self.group):
            raise ValueError(f"GroupSelfAttention expects group signals [B, {self.in_channels}, {len(self.group)}, H, "
                             f"W] (group {self.group.name}), got {tuple(x.shape)}")
        self._check_spatial(x.shape[-2], x.shape[-1])

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[B, C_out, G, H, W]``; with ``return_attention=True`` also the attention probabilities of the plain
        path (before dropout, no gradient), as :meth:`attention_probabilities` gives them."""
        self._check(x)
        q, k, v = self._heads(x.permute(0, 3, 4, 2, 1))
        out = self._merge(self._attend(q, k, v), x.shape[0])
        return (out, self.attention_probabilities(x)) if return_attention else out

    @torch.no_grad()
    def attention_probabilities(self, x: Tensor) -> Tensor:
        """Softmax probabilities (no dropout), ``[B, heads, G(v), G(g), H, W, G(m), P, P]`` (global: ``..., H, W``)."""
        self._check(x)
        q, k, _ = self._heads(x.permute(0, 3, 4, 2, 1))
        return self._probabilities(q, k, x.shape[0])
