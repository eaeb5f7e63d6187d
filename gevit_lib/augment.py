"""On-device training augmentations for ``fit``: all randomness comes from the generator that ``fit`` seeds and
checkpoints, so a resumed run draws the same augmentations."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "random_rotation", "random_d4"]

Augment = Callable[[Tensor, torch.Generator], Tensor]


def random_rotation(degrees: float = 180.0, fill: float = 0.0, flips: bool = False,
                    interpolation: str = "nearest") -> Augment:
    """Rotate each image by a uniform angle in ``[-degrees, degrees]`` (nearest, like torchvision's
    ``RandomRotation``; exposed corners = ``fill``), then with ``flips`` flip H and W each with probability 1/2."""

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        angle = (torch.rand(x.shape[0], generator=generator, device=generator.device) * 2 - 1) * math.radians(degrees)
        angle = angle.to(x.device, x.dtype)
        c, s = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(c)
        theta = torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1)], -2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x - fill, grid, mode=interpolation, padding_mode="zeros", align_corners=False) + fill
        return _random_flips(out, generator) if flips else out

    return augment


def _random_flips(x: Tensor, generator: torch.Generator) -> Tensor:
    for dim in (-1, -2):
        mask = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
        x = torch.where(mask.to(x.device).view(-1, 1, 1, 1), torch.flip(x, dims=(dim,)), x)
    return x


def random_d4() -> Augment:
    """A random multiple of 90 degrees, then random horizontal and vertical flips (the original's PCam training)."""

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        k = torch.randint(0, 4, (x.shape[0],), generator=generator, device=generator.device).to(x.device)
        out = x.clone()
        for q in (1, 2, 3):
            sel = k == q
            if bool(sel.any()):
                out[sel] = torch.rot90(x[sel], q, dims=(-2, -1))
        return _random_flips(out, generator)

    return augment
