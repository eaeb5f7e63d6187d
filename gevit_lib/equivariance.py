"""Measuring invariance and equivariance errors under group actions and under arbitrary rotation angles.

Exact symmetries (quarter turns, mirrors) are what tests assert; other angles are interpolated and only measured
(:func:`rotation_sweep`). :func:`rotate_lifting_attention` says how a lifting layer's attention maps must move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .groups import Group, get_group, rotate

__all__ = ["relative_error", "invariance_errors", "equivariance_errors", "rotation_sweep", "EXACT_TRANSFORMS",
           "exact_invariance", "rotate_lifting_attention", "lifting_attention_error"]


def relative_error(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` (the scale of ``b``; 1 when ``b`` is all zeros)."""
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


@torch.no_grad()
def invariance_errors(model: Callable[[Tensor], Tensor], x: Tensor, group: Group | str,
                      elements: Iterable[int] | None = None) -> dict[int, float]:
    """Relative change of ``model(x)`` when the input is transformed by each element (default: the exact ones)."""
    group = get_group(group)
    ref = model(x)
    elems = group.exact_elements if elements is None else list(elements)
    return {g: relative_error(model(group.act_on_image(x, g)), ref) for g in elems}


@torch.no_grad()
def equivariance_errors(fn: Callable[[Tensor], Tensor], x: Tensor, group: Group | str,
                        elements: Iterable[int] | None = None, side: str = "right",
                        lifted_input: bool = False) -> dict[int, float]:
    """Relative error of ``fn(T_g x) == T_g fn(x)`` for outputs ``[B, C, G, H, W]``; ``x`` is an image
    ``[B, C, H, W]`` (a lifting layer) or, with ``lifted_input``, a group signal."""
    group = get_group(group)
    out = fn(x)
    elems = group.exact_elements if elements is None else list(elements)
    errors = {}
    for g in elems:
        gx = group.act_on_group_signal(x, g, side) if lifted_input else group.act_on_image(x, g)
        errors[g] = relative_error(fn(gx), group.act_on_group_signal(out, g, side))
    return errors


@torch.no_grad()
def rotation_sweep(model: Callable[[Tensor], Tensor], x: Tensor, angles: Iterable[float],
                   interpolation: str = "bilinear") -> Tensor:
    """Relative change of ``model(x)`` for inputs rotated CCW by each angle in degrees (zero fill)."""
    ref = model(x)
    errs = [relative_error(model(rotate(x, float(angle), interpolation)), ref) for angle in angles]
    return torch.tensor(errs, dtype=torch.float64)


# The exact symmetries of a square pixel grid that the notebooks measure: pixel permutations, no interpolation.
EXACT_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    **{f"rot{90 * k}": (lambda x, k=k: torch.rot90(x, k, dims=(-2, -1))) for k in (1, 2, 3)},
    "flip": lambda x: torch.flip(x, dims=(-1,)),
}


@torch.no_grad()
def exact_invariance(model: Callable[[Tensor], Tensor], x: Tensor,
                     transforms: Sequence[str] = ("rot90", "rot180", "rot270")) -> dict[str, float]:
    """:func:`relative_error` of ``model`` for each named transform of :data:`EXACT_TRANSFORMS`."""
    ref = model(x)
    return {name: relative_error(model(EXACT_TRANSFORMS[name](x)), ref) for name in transforms}


def rotate_lifting_attention(maps: Tensor, group: Group | str, k: int = 1, side: str = "right") -> Tensor:
    """What lifting attention maps ``[B, heads, G, H, W, P, P]`` must become when the image is turned by ``k``
    quarter turns: the group axis permuted by the regular action (``side``: "right" for GE-ViT, "left" for
    GSA-Nets), the pixel and neighbourhood axes turned."""
    group = get_group(group)
    t = group.rot90_element(k)
    perm = group.right_regular(t) if side == "right" else group.left_regular(t)
    moved = maps.index_select(2, perm.to(maps.device))  # group axis permuted
    return torch.rot90(torch.rot90(moved, k, dims=(3, 4)), k, dims=(5, 6))  # pixels, then neighbourhood


@torch.no_grad()
def lifting_attention_error(layer: torch.nn.Module, x: Tensor, k: int = 1) -> float:
    """Largest absolute difference between a lifting layer's attention for ``rot90(x, k)`` and its attention for
    ``x`` moved by :func:`rotate_lifting_attention` (~1e-7 in float32 when equivariant)."""
    _, maps = layer(x, return_attention=True)
    _, turned = layer(torch.rot90(x, k, dims=(-2, -1)), return_attention=True)
    expected = rotate_lifting_attention(maps, layer.group, k, layer.feature_side)
    return float((turned - expected).abs().max())
