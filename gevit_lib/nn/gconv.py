"""Exact group convolutions (G-CNN layers) for the groups that permute the pixel grid: C1, C2, C4, D1, D2, D4.

Every filter transform is an exact pixel permutation (``Group.act_on_image``), every group-axis transform a regular
permutation (``Group.act_on_group_signal``); features transform by the **left** regular representation,
``out'[h] = T_g out[g^-1 h]``. Lifting: ``out[h] = (T_h W) * x``; group conv: ``out[h] = sum_k (T_h W[h^-1 k]) * f[k]``.
``impl="fast"`` gathers the transformed filter bank once and runs one ``conv2d``; ``impl="plain"`` transforms the
input instead, ``out[h] = T_h (W * T_h^-1 x)``. Why hand-written, and more: docs/architecture.md.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import Group, get_group
from .attention import check_impl

__all__ = ["check_exact_group", "LiftingConv", "GroupConv", "GroupPool", "GroupSignalNorm", "GCNN"]


def check_exact_group(group: Group | str) -> Group:
    """The group, if every element acts on square pixel grids as a permutation (multiples of 90 degrees, mirrors)."""
    grp = get_group(group)
    if len(grp.exact_elements) != len(grp):
        raise ValueError(f"G-CNN layers need a group whose elements are exact pixel permutations (rotations by "
                         f"multiples of 90 degrees and mirrors: z2, mz2, p4, p4m, C2, D2, ...); {grp.name} has "
                         f"rotations by {360 / grp.n_rotations:g} degrees")
    return grp


def _bank_index(group: Group, shape: tuple[int, ...], group_filter: bool) -> Tensor:
    """Index into the flattened filter: ``bank[h] = flat[index[h]]`` is the filter transformed by element h.

    Lifting filters ``[O, I, k, k]`` transform as images; group filters ``[O, I, G, k, k]`` as left-regular group
    signals. The result is ``[O, G, I, (G,) k, k]`` so that it reshapes to a conv2d weight ``[O*G, I*(G), k, k]``.
    """
    ids = torch.arange(math.prod(shape)).view(shape)
    if group_filter:
        banks = [group.act_on_group_signal(ids, h, side="left", group_dim=2) for h in range(len(group))]
    else:
        banks = [group.act_on_image(ids, h) for h in range(len(group))]
    return torch.stack(banks, dim=1)


class _GConvBase(nn.Module):
    lifted_input: bool = False

    def __init__(self, group: Group | str, in_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 0, bias: bool = True, impl: str = "fast") -> None:
        super().__init__()
        self.group = check_exact_group(group)
        if min(in_channels, out_channels, kernel_size) < 1 or padding < 0:
            raise ValueError(f"channels and kernel_size must be positive and padding >= 0, got in={in_channels}, "
                             f"out={out_channels}, kernel_size={kernel_size}, padding={padding}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding = kernel_size, padding
        self.impl = check_impl(impl)
        g_in = len(self.group) if self.lifted_input else 1
        shape = (out_channels, in_channels, *((g_in,) if self.lifted_input else ()), kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("bank_index", _bank_index(self.group, shape, self.lifted_input), persistent=False)
        # He init for the fan-in of one output element (in_channels * G_in * k * k)
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (in_channels * g_in * kernel_size**2)))

    def filter_bank(self) -> Tensor:
        """All transformed filters as one conv2d weight ``[out * G, in * G_in, k, k]`` (G_in = 1 for lifting)."""
        bank = self.weight.flatten()[self.bank_index]  # [O, G, I, (G,) k, k]
        k = self.kernel_size
        return bank.reshape(self.out_channels * len(self.group), -1, k, k)

    def output_size(self, size: int) -> int:
        return size + 2 * self.padding - self.kernel_size + 1

    def forward(self, x: Tensor) -> Tensor:
        g, name = len(self.group), type(self).__name__
        if self.lifted_input and (x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[2] != g):
            raise ValueError(f"{name} expects group signals [B, {self.in_channels}, {g}, H, W] (group "
                             f"{self.group.name}), got {tuple(x.shape)}")
        if not self.lifted_input and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"{name} expects images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.group.n_rotations > 2 and h != w:
            raise ValueError(f"{name} with group {self.group.name} needs square inputs, got {h}x{w}")
        if self.output_size(min(h, w)) < 1:
            raise ValueError(f"a {h}x{w} input is smaller than the {self.kernel_size}x{self.kernel_size} kernel "
                             f"with padding {self.padding}")
        if self.impl == "fast":
            out = F.conv2d(x.flatten(1, -3), self.filter_bank(), padding=self.padding)  # group axis into channels
            out = out.view(x.shape[0], self.out_channels, g, *out.shape[-2:])
        else:  # transform the input instead of the filter: out[e] = T_e (W * T_e^-1 x)
            act = partial(self.group.act_on_group_signal, side="left") if self.lifted_input else self.group.act_on_image
            weight, outs = self.weight.flatten(1, -3), []  # [O, I*(G), k, k]
            for e in range(g):
                moved = act(x, self.group.inv(e)).flatten(1, -3)
                outs.append(self.group.act_on_image(F.conv2d(moved, weight, padding=self.padding), e))
            out = torch.stack(outs, dim=2)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1)

    def extra_repr(self) -> str:
        return (f"group={self.group.name}, in={self.in_channels}, out={self.out_channels}, "
                f"kernel_size={self.kernel_size}, padding={self.padding}, bias={self.bias is not None}, "
                f"impl={self.impl!r}")


class LiftingConv(_GConvBase):
    """Lifting convolution: images ``[B, C_in, H, W]`` -> group signals ``[B, C_out, G, H', W']``,
    ``out[h] = (T_h W) * x`` (H' = H + 2 padding - k + 1)."""


class GroupConv(_GConvBase):
    """Group convolution: ``[B, C_in, G, H, W]`` -> ``[B, C_out, G, H', W']``,
    ``out[h] = sum_k (T_h W[h^-1 k]) * f[k]``; weight ``[C_out, C_in, G, k, k]``."""

    lifted_input = True


class GroupPool(nn.Module):
    """Invariant pooling over the group axis: ``[B, C, G, H, W]`` -> ``[B, C, H, W]`` ("max" or "mean").

    The result transforms as an image (``T_g``) whenever the input transforms by a regular representation."""

    def __init__(self, mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "mean"):
            raise ValueError(f"mode must be 'max' or 'mean', got {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"GroupPool expects group signals [B, C, G, H, W], got {tuple(x.shape)}")
        return x.amax(dim=2) if self.mode == "max" else x.mean(dim=2)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class GroupSignalNorm(nn.GroupNorm):
    """Layer norm over (C, G, H, W) of each sample, optional per-channel affine (equivariant: the statistics and the
    affine map do not depend on the group or spatial position). ``affine=False`` is the post's G-CNN norm."""

    def __init__(self, channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__(1, channels, eps=eps, affine=affine)


class GCNN(nn.Module):
    """A plain G-CNN stack: lifting conv, then ``num_layers - 1`` group convs, each followed by ``GroupSignalNorm`` (no
    affine unless ``norm_affine``) and ReLU. Output: a group signal ``[B, hidden, G, H', W']`` (left action)."""

    def __init__(self, group: Group | str, in_channels: int, hidden_channels: int, num_layers: int = 2,
                 kernel_size: int = 3, padding: int = 0, bias: bool = True, norm: bool = True,
                 norm_affine: bool = False, impl: str = "fast") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.group = check_exact_group(group)
        self.in_channels, self.hidden_channels, self.num_layers = in_channels, hidden_channels, num_layers
        self.kernel_size, self.padding = kernel_size, padding
        layers: list[nn.Module] = []
        for i in range(num_layers):
            conv_cls = LiftingConv if i == 0 else GroupConv
            c_in = in_channels if i == 0 else hidden_channels
            layers.append(conv_cls(self.group, c_in, hidden_channels, kernel_size, padding, bias, impl))
            if norm:
                layers.append(GroupSignalNorm(hidden_channels, affine=norm_affine))
            layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def output_size(self, size: int) -> int:
        return size + self.num_layers * (2 * self.padding - self.kernel_size + 1)

    def set_impl(self, impl: str) -> GCNN:
        check_impl(impl)
        for m in self.modules():
            if isinstance(m, _GConvBase):
                m.impl = impl
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"GCNN expects images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.output_size(min(x.shape[-2:])) < 1:
            raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} input is too small for {self.num_layers} layers of "
                             f"{self.kernel_size}x{self.kernel_size} kernels with padding {self.padding}")
        return self.layers(x)
