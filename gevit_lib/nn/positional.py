"""Relative positional encodings of GE-ViT and GSA-Nets: offset grids, their transforms, group-axis index tables.

A query at pixel x looks at neighbours x + delta in a P x P window (global attention: a (2S-1) x (2S-1) window),
offsets scaled to [-1, 1]. For every output group element v the grid is moved by v and each coordinate embedded by
a small MLP (:class:`CoordinateMLP`): ``pos[v, delta] = (e_row(row of A_v delta), e_col(column of A_v delta))``,
``[G, P*P, 2 * dim]`` from :class:`RelativePositionalEncoding`. ``positional="gevit"`` moves the (x, y) vector by
the group matrix (features then transform by the right regular action); ``"gsa"`` rotates (row, column) and flips
the array (GSA-Nets: the left action). ``group_index_table`` gives ``gidx[v, g, m]`` ("corrected": exactly
equivariant; "reference": the original code's, needed for the published p4m checkpoint). The conventions in
detail: docs/architecture.md; the group table: docs/group_table.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..groups import Group, get_group

__all__ = ["POSITIONAL", "GROUP_INDEX", "normalised_offsets", "relative_coordinates", "reference_relative_positions",
           "group_index_table", "feature_action_side", "CoordinateMLP", "RelativePositionalEncoding"]

POSITIONAL: tuple[str, ...] = ("gevit", "gsa")
GROUP_INDEX: tuple[str, ...] = ("corrected", "reference")


def _check_positional(positional: str) -> str:
    if positional not in POSITIONAL:
        raise ValueError(f"positional must be one of {POSITIONAL}, got {positional!r}")
    return positional


def feature_action_side(positional: str) -> str:
    """How the group axis of the features permutes: "right" for GE-ViT, "left" for GSA-Nets."""
    return "right" if _check_positional(positional) == "gevit" else "left"


def normalised_offsets(size: int) -> Tensor:
    """``size`` evenly spaced values from -1 to 1 (the original's ``normalize_tensor_one_minone(arange(size))``)."""
    if size < 2:
        raise ValueError(f"a relative-position table needs at least 2 offsets, got {size}")
    return torch.arange(size, dtype=torch.float64) / ((size - 1) / 2.0) - 1.0


def relative_coordinates(group: Group | str, size: int, positional: str = "gevit") -> Tensor:
    """Transformed offset grid per group element, float64 ``[G, size, size, 2]``: ``[..., 0]`` feeds the row
    embedding, ``[..., 1]`` the column embedding; grid position (i, j) = row offset i, column offset j."""
    group = get_group(group)
    _check_positional(positional)
    o = normalised_offsets(size)
    rows = o.view(-1, 1).expand(size, size)
    cols = o.view(1, -1).expand(size, size)
    out = []
    for v, (k, s) in enumerate(group.elements):
        if positional == "gevit":
            xy = torch.stack([cols, rows], -1) @ group.matrices[v].T  # (x, y) -> A_v (x, y)
            out.append(torch.stack([xy[..., 1], xy[..., 0]], -1))
        else:
            rot = group.matrices[group.index(k)]  # R(theta_k), exact for multiples of 90 degrees
            rc = torch.stack([rows, cols], -1) @ rot.T  # (row, col) -> R(theta) (row, col)
            out.append(torch.flip(rc, dims=(1,)) if s else rc)
    return torch.stack(out)


# ---- the original code's construction of the group-axis tables, re-implemented --------------------------------
def _roll_action(group: Group, k: int, s: int, table: Tensor, positional: str) -> Tensor:
    """The original ``left_action_on_H`` of the element with rotation step ``k`` (may be negative) and mirror bit s."""
    n = group.n_rotations
    if not group.mirror:  # SE2: roll along the last axis by -k
        return torch.roll(table, shifts=-k, dims=-1) if k % n else table
    if k % n == 0 and not s:
        return table
    halves = table.clone().reshape(2, n, -1)
    if k % n:
        halves[0] = torch.roll(halves[0], shifts=-k, dims=-2)
        halves[1] = torch.roll(halves[1], shifts=k, dims=-2)
    if s:
        halves = (halves + n) % (2 * n) if positional == "gevit" else torch.roll(halves, shifts=1, dims=0)
    return halves.reshape(table.shape)


def reference_relative_positions(group: Group | str, positional: str = "gevit") -> Tensor:
    """The original group's ``_relative_positions`` buffer, int64 ``[G, G]`` (E2 acts with (-theta, s))."""
    group = get_group(group)
    _check_positional(positional)
    order, n = len(group), group.n_rotations
    if not group.mirror:
        if positional == "gevit":  # start from [0, N-1, ..., 1] and act twice with the inverse rotation
            idx = torch.tensor([0] + list(range(order - 1, 0, -1)), dtype=torch.int64)
            return torch.stack([_roll_action(group, -k, 0, _roll_action(group, -k, 0, idx, positional), positional)
                                for k, _ in group.elements])
        return torch.stack([_roll_action(group, -k, 0, torch.arange(order), positional) for k, _ in group.elements])
    if positional == "gevit" and order == 2:
        return torch.tensor([[0, 1], [0, 1]], dtype=torch.int64)
    return torch.stack([_roll_action(group, -k, s, torch.arange(order), positional) for k, s in group.elements])


def group_index_table(group: Group | str, kind: str = "corrected", positional: str = "gevit") -> Tensor:
    """``gidx[v, g, m]``, int64 ``[G, G, G]``: index of the group embedding for output v, query g, key m."""
    group = get_group(group)
    _check_positional(positional)
    order = len(group)
    if kind == "corrected":
        mul, inv = group.cayley, group.inverses
        e = torch.arange(order)
        v, g, m = e.view(-1, 1, 1), e.view(1, -1, 1), e.view(1, 1, -1)
        if positional == "gevit":  # g v^-1 g m^-1: invariant under the right action (v t, g t, m t)
            return mul[mul[mul[g, inv[v]], g], inv[m]]
        return mul[mul[mul[inv[g], v], inv[g]], m]  # g^-1 v g^-1 m: invariant under (t v, t g, t m)
    if kind == "reference":
        rel = reference_relative_positions(group, positional)
        return torch.stack([_roll_action(group, k, s, rel, positional) for k, s in group.elements])
    raise ValueError(f"group_index must be one of {GROUP_INDEX}, got {kind!r}")


# ---- modules ----------------------------------------------------------------------------------------------------
class CoordinateMLP(nn.Module):
    """Embedding of a scalar coordinate (the original's): Linear(1, 16), LayerNorm(16), Swish, Linear(16, dim)."""

    def __init__(self, dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(1, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.out = nn.Linear(hidden, dim)

    def forward(self, coords: Tensor) -> Tensor:
        return self.out(nn.functional.silu(self.norm(self.inp(coords.unsqueeze(-1)))))


class RelativePositionalEncoding(nn.Module):
    """Row, column (and group) embeddings of relative positions for every output group element.

    ``spatial()`` gives ``[G, size*size, 2*pos_dim]`` (row embedding then column embedding of each transformed
    offset, matching the query channels ``[:pos_dim]`` and ``[pos_dim:2*pos_dim]``); ``group_embedding`` holds the
    ``[G, group_dim]`` table indexed by the buffer ``group_index`` ``[G, G, G]`` (absent when ``group_dim == 0``).
    """

    def __init__(self, group: Group | str, size: int, pos_dim: int, group_dim: int = 0, positional: str = "gevit",
                 group_index: str = "corrected") -> None:
        super().__init__()
        self.group = get_group(group)
        self.size, self.pos_dim, self.group_dim = size, pos_dim, group_dim
        self.positional, self.group_index_kind = _check_positional(positional), group_index
        self.row = CoordinateMLP(pos_dim)
        self.col = CoordinateMLP(pos_dim)
        self.register_buffer("coords", relative_coordinates(self.group, size, positional).to(torch.get_default_dtype()),
                             persistent=False)
        if group_index not in GROUP_INDEX:
            raise ValueError(f"group_index must be one of {GROUP_INDEX}, got {group_index!r}")
        self.group_embedding = nn.Embedding(len(self.group), group_dim) if group_dim else None
        if group_dim:
            table = group_index_table(self.group, group_index, positional)
            self.register_buffer("group_index", table, persistent=False)

    def spatial(self) -> Tensor:
        c = self.coords.flatten(1, 2)  # [G, S*S, 2]
        return torch.cat([self.row(c[..., 0]), self.col(c[..., 1])], -1)

    def extra_repr(self) -> str:
        return (f"group={self.group.name}, size={self.size}, pos_dim={self.pos_dim}, group_dim={self.group_dim}, "
                f"positional={self.positional!r}, group_index={self.group_index_kind!r}")
