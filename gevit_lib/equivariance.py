"""Measuring invariance and equivariance errors under group actions and under arbitrary rotation angles.

Exact symmetries (multiples of 90 degrees, mirrors) are what tests assert; other angles go through interpolation
and are only measured (:func:`rotation_sweep`), never asserted to be exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .groups import Group, get_group, rotate

__all__ = ["relative_error", "invariance_errors", "equivariance_errors", "rotation_sweep"]


def relative_error(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` (the scale of ``b``; 1 when ``b`` is all zeros)."""
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


@torch.no_grad()
def invariance_errors(model: Callable[[Tensor], Tensor], x: Tensor, group: Group | str,
                      elements: Iterable[int] | None = None) -> dict[int, float]:
    """Relative change of ``model(x)`` when the input is transformed by each element (default: the exact ones)."""
    group = get_group(group) if isinstance(group, str) else group
    ref = model(x)
    elems = group.exact_elements if elements is None else list(elements)
    return {g: relative_error(model(group.act_on_image(x, g)), ref) for g in elems}


@torch.no_grad()
def equivariance_errors(fn: Callable[[Tensor], Tensor], x: Tensor, group: Group | str,
                        elements: Iterable[int] | None = None, side: str = "right",
                        lifted_input: bool = False) -> dict[int, float]:
    """Relative error of ``fn(T_g x) == T_g fn(x)`` for group signals ``[B, C, G, H, W]`` (regular action on G).

    ``lifted_input=False`` means ``x`` is an image ``[B, C, H, W]`` (a lifting layer); otherwise a group signal.
    """
    group = get_group(group) if isinstance(group, str) else group
    out = fn(x)
    elems = group.exact_elements if elements is None else list(elements)
    errors = {}
    for g in elems:
        gx = group.act_on_group_signal(x, g, side) if lifted_input else group.act_on_image(x, g)
        errors[g] = relative_error(fn(gx), group.act_on_group_signal(out, g, side))
    return errors


@torch.no_grad()
def rotation_sweep(model: Callable[[Tensor], Tensor], x: Tensor, angles: Iterable[float]) -> Tensor:
    """Relative change of ``model(x)`` for inputs rotated counter-clockwise by each angle in degrees (bilinear).

    Multiples of 90 degrees use ``torch.rot90`` (exact); other angles are interpolated, zero fill.
    """
    ref = model(x)
    errs = []
    for angle in angles:
        errs.append(relative_error(model(rotate(x, float(angle))), ref))
    return torch.tensor(errs, dtype=torch.float64)
