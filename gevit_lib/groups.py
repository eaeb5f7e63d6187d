"""Finite rotation and roto-reflection groups (C_n, D_n) from explicit 2x2 matrices, and their actions.

Conventions (GE-ViT's, so group axes line up with the published checkpoints; docs/architecture.md has more):

- Plane coordinates are ``(x, y)`` = (column offset, row offset), y pointing **down**.
- Element ``(k, s)``, index ``k + n * s`` (identity 0), is ``A = M^s R(2 pi k / n)`` with ``M = diag(-1, 1)``.
  So element ``(1, 0)`` of p4 acts on an image as ``torch.rot90(x, -1)`` (clockwise, see :meth:`Group.rot90_element`)
  and ``(0, 1)`` as ``torch.flip(x, (-1,))``.
- Images transform as ``(T_g f)(p) = f(A_g^{-1} p)`` about the centre: exact for multiples of 90 degrees and
  mirrors, bilinear otherwise. Group axes transform by the left (``f(g^-1 h)``) or right (``f(h g)``) regular
  representation; GE-ViT's features as ``f'(h) = T_g f(h g)`` (:meth:`Group.act_on_group_signal`, ``side="right"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["Group", "get_group", "GROUP_NAMES"]

# name -> (number of rotations, has mirror)
_NAMED = {"z2": (1, False), "p4": (4, False), "p8": (8, False), "p12": (12, False), "p16": (16, False),
          "mz2": (1, True), "p4m": (4, True), "p8m": (8, True)}
GROUP_NAMES: tuple[str, ...] = tuple(_NAMED)


def _snapped(x: Tensor) -> Tensor:
    """``x`` with entries within 1e-12 of a multiple of 1/2 set to it: cos and sin of multiples of 90 degrees are
    then exact (not 6e-17), so a rotated offset grid is exactly a permutation of the grid."""
    half = torch.round(2 * x) / 2
    return torch.where((x - half).abs() < 1e-12, half, x)


@dataclass(frozen=True)
class Group:
    """The cyclic group C_n (``mirror=False``) or the dihedral group D_n (``mirror=True``) of order n or 2n."""

    name: str
    n_rotations: int
    mirror: bool
    elements: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.n_rotations < 1:
            raise ValueError(f"a group needs at least one rotation, got n_rotations={self.n_rotations}")
        elems = tuple((k, s) for s in ((0, 1) if self.mirror else (0,)) for k in range(self.n_rotations))
        object.__setattr__(self, "elements", elems)

    # ---- basic structure -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.elements)

    def index(self, k: int, s: int = 0) -> int:
        """Index of the element with k of n rotation steps and mirror bit s."""
        if s and not self.mirror:
            raise ValueError(f"group {self.name} has no mirrored elements")
        return k % self.n_rotations + self.n_rotations * int(s)

    @cached_property
    def matrices(self) -> Tensor:
        """``M^s R(theta)`` for every element, float64 [G, 2, 2], acting on (x = column, y = row down)."""
        angles = torch.tensor([2 * math.pi * k / self.n_rotations for k, _ in self.elements], dtype=torch.float64)
        mirrors = torch.tensor([s for _, s in self.elements], dtype=torch.int64)
        c, s = _snapped(torch.cos(angles)), _snapped(torch.sin(angles))
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        mirror = torch.diag_embed(torch.stack([1.0 - 2.0 * mirrors.double(), torch.ones(len(self))], -1))
        return mirror @ rot

    @cached_property
    def cayley(self) -> Tensor:
        """Cayley table, int64 [G, G]: ``cayley[a, b]`` = index of the product ``a b`` (matrix product)."""
        mats = self.matrices
        prod = mats[:, None] @ mats[None, :]  # [G, G, 2, 2]
        dist = (prod[:, :, None] - mats[None, None]).abs().flatten(-2).amax(-1)  # [G, G, G]
        table = dist.argmin(-1)
        if not bool((dist.amin(-1) < 1e-9).all()):
            raise AssertionError(f"{self.name}: the element matrices are not closed under multiplication")
        return table

    @cached_property
    def inverses(self) -> Tensor:
        """Index of each element's inverse, int64 [G]."""
        return (self.cayley == 0).int().argmax(-1)  # index 0 is the identity

    def mul(self, a: int, b: int) -> int:
        return int(self.cayley[a, b])

    def inv(self, a: int) -> int:
        return int(self.inverses[a])

    def is_exact(self, g: int) -> bool:
        """True when element g acts on the pixel grid as an exact permutation (multiple of 90 degrees, mirrors)."""
        k, _ = self.elements[g]
        return (4 * k) % self.n_rotations == 0

    @property
    def exact_elements(self) -> list[int]:
        """Elements whose image action is an exact pixel permutation (the exact subgroup)."""
        return [g for g in range(len(self)) if self.is_exact(g)]

    def rot90_element(self, k: int = 1) -> int:
        """The element acting as ``torch.rot90(x, k, dims=(-2, -1))`` (counter-clockwise); needs 4 | n."""
        if self.n_rotations % 4:
            raise ValueError(f"group {self.name} does not contain rotations by 90 degrees")
        return self.index(-k * self.n_rotations // 4)

    def flip_element(self) -> int:
        """The element acting as ``torch.flip(x, (-1,))`` (mirror of the W axis)."""
        return self.index(0, 1)

    # ---- representations on the group axis -------------------------------------------------------------------
    def left_regular(self, g: int) -> Tensor:
        """Permutation ``perm`` with ``(L_g f)[h] = f[perm[h]] = f[g^-1 h]``."""
        return self.cayley[self.inverses[g]].clone()

    def right_regular(self, g: int) -> Tensor:
        """Permutation ``perm`` with ``(R_g f)[h] = f[perm[h]] = f[h g]``."""
        return self.cayley[:, g].clone()

    # ---- actions on the plane and on images --------------------------------------------------------------------
    def act_on_coordinates(self, coords: Tensor, g: int) -> Tensor:
        """Apply element g's matrix to coordinates ``[..., 2]`` given as (x = column, y = row)."""
        return coords @ self.matrices[g].to(coords.dtype).T

    def act_on_image(self, x: Tensor, g: int) -> Tensor:
        """``T_g x`` for images ``[..., H, W]``: exact for multiples of 90 degrees and mirrors, else bilinear."""
        k, s = self.elements[g]
        if self.is_exact(g):
            quarter = (4 * k) // self.n_rotations
            if quarter and x.shape[-1] != x.shape[-2]:
                raise ValueError(f"rotating a non-square image {tuple(x.shape[-2:])} by 90 degrees changes its shape")
            out = torch.rot90(x, -quarter, dims=(-2, -1)) if quarter else x
        else:
            out = rotate(x, -360.0 * k / self.n_rotations)
        return torch.flip(out, dims=(-1,)) if s else out

    def act_on_group_signal(self, x: Tensor, g: int, side: str = "right", group_dim: int = -3) -> Tensor:
        """Act on a signal ``[..., G, H, W]``: image action on every slice and a regular permutation of the group axis.

        ``side="right"``: ``x'[h] = T_g x[h g]`` (how GE-ViT features transform); ``"left"``: ``x'[h] = T_g x[g^-1 h]``.
        """
        if x.shape[group_dim] != len(self):
            raise ValueError(f"group axis {group_dim} has size {x.shape[group_dim]}, group {self.name} has {len(self)}")
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        perm = self.right_regular(g) if side == "right" else self.left_regular(g)
        return self.act_on_image(x.index_select(group_dim, perm.to(x.device)), g)

    def __repr__(self) -> str:
        kind = "D" if self.mirror else "C"
        return f"Group({self.name!r}: {kind}{self.n_rotations}, order {len(self)})"


def rotate(x: Tensor, degrees: float, interpolation: str = "bilinear") -> Tensor:
    """Rotate images ``[..., H, W]`` counter-clockwise about their centre, zero fill: the library's one rotation.

    Multiples of 90 degrees are exact (``torch.rot90``); other angles are interpolated by torchvision.
    """
    from torchvision.transforms.functional import InterpolationMode, rotate as tv_rotate

    quarter, rest = divmod(float(degrees), 90.0)
    if rest == 0.0:
        return torch.rot90(x, int(quarter) % 4, dims=(-2, -1))
    modes = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
    shape = x.shape
    out = tv_rotate(x.reshape(-1, 1, *shape[-2:]), float(degrees), interpolation=modes[interpolation])
    return out.reshape(shape)


def translate(x: Tensor, dy: int, dx: int) -> Tensor:
    """Shift the content of images ``[..., H, W]`` by (dy, dx) pixels (negative = up / left), zero fill."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def get_group(name: str) -> Group:
    """A group by name: z2, p4, p8, p12, p16 (cyclic), mz2, p4m, p8m (dihedral), or ``C<n>`` / ``D<n>``."""
    if isinstance(name, Group):
        return name
    key = str(name).strip()
    if key.lower() in _NAMED:
        n, mirror = _NAMED[key.lower()]
        return Group(key.lower(), n, mirror)
    match = re.fullmatch(r"([CcDd])(\d+)", key)
    if match and int(match.group(2)) >= 1:
        return Group(key.upper(), int(match.group(2)), match.group(1).upper() == "D")
    raise ValueError(f"unknown group {name!r}; valid names: {', '.join(GROUP_NAMES)}, or C<n> / D<n> (e.g. C16, D4)")
