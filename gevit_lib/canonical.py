"""Learned canonicalization as a post-hoc method (Kaba et al., ICML 2023; Mondal et al., NeurIPS 2023, equiadapt).

A small G-CNN scores every group element, the input is turned back by the best-scoring one (its canonical pose) and
the backbone runs once: exactly C4 / D4 invariant, for C8 / C16 only to quarter turns. See docs/posthoc_formulas.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gevit_lib.groups import Group, get_group
from gevit_lib.nn.gconv import GroupConv, GroupSignalNorm, LiftingConv
from gevit_lib.posthoc import BackboneWrapper, TransformStack, backbone_interface

__all__ = ["CanonicalizationNet", "Canonicalized"]


def _halve(f: Tensor) -> Tensor:
    """2x average pooling of a group signal ``[B, C, G, H, W]``; adaptive bins commute with rot90 and flips for any
    size (a plain stride-2 pool of an odd size would not)."""
    b, c, g, h, w = f.shape
    out = F.adaptive_avg_pool2d(f.flatten(1, 2), ((h + 1) // 2, (w + 1) // 2))
    return out.view(b, c, g, *out.shape[-2:])


class CanonicalizationNet(nn.Module):
    """Scores ``[B, |G|]`` of every group element, equivariant: ``scores(T_h x)[g] = scores(x)[h^-1 g]``.

    Lifting conv, then ``num_layers - 1`` times (2x average pool, group conv), each with ``GroupSignalNorm`` and
    ReLU, the mean over space and one linear map over channels. ``hidden``: channels per element, default
    ``32 // |G|`` (at least 4: C4 and D4 cost about the same); larger images are first pooled to ``input_size``.
    """

    def __init__(self, group: str | Group, in_channels: int, hidden: int | None = None, num_layers: int = 3,
                 kernel_size: int = 3, input_size: int | None = 32) -> None:
        super().__init__()
        self.group = get_group(group)
        n = self.group.n_rotations
        self.exact = len(self.group.exact_elements) == len(self.group)
        if not self.exact and (self.group.mirror or n % 4):
            raise ValueError(f"learned canonicalization needs C1, C2, C4, D1, D2, D4 (exact) or C_4m such as C8 / "
                             f"C16 (exact for quarter turns only); got {self.group.name}")
        self.copies = 1 if self.exact else n // 4  # m: rotated copies the C4 net scores
        net_group = self.group if self.exact else get_group("C4")
        hidden = max(4, 32 // len(net_group)) if hidden is None else hidden
        if num_layers < 1 or hidden < 1:
            raise ValueError(f"num_layers and hidden must be >= 1, got {num_layers}, {hidden}")
        self.in_channels, self.input_size = in_channels, input_size
        pad = kernel_size // 2
        self.convs = nn.ModuleList([LiftingConv(net_group, in_channels, hidden, kernel_size, pad)] + [
            GroupConv(net_group, hidden, hidden, kernel_size, pad) for _ in range(num_layers - 1)])
        self.norms = nn.ModuleList(GroupSignalNorm(hidden) for _ in range(num_layers))
        self.out = nn.Linear(hidden, 1)
        self.angles = None if self.exact else TransformStack(self.group, subgroup_exact=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the canonicalization net expects images [B, {self.in_channels}, H, W], got "
                             f"{tuple(x.shape)}; set in_channels to the backbone's input channels")
        b, m = x.shape[0], self.copies
        if self.input_size is not None and max(x.shape[-2:]) > self.input_size:
            x = F.adaptive_avg_pool2d(x, self.input_size)
        if self.angles is not None:
            x = self.angles(x)[:, :m].flatten(0, 1)  # copy j: j * 360 / n degrees CCW, element index -j
        f = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            f = F.relu(norm(conv(_halve(f) if i else f)))
        s = self.out(f.mean(dim=(-2, -1)).transpose(1, 2)).squeeze(-1)  # [B * m, G of the net]
        # C_4m: quarter turn k of copy j is the element k * m + j (rotation by k * 90 + j * 360 / n degrees)
        return s.view(b, m, -1).transpose(1, 2).reshape(b, -1)


def _in_channels(backbone: nn.Module) -> int:
    value = getattr(backbone, "num_channels", None)
    if isinstance(value, int):
        return value
    conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"cannot tell the input channels of {type(backbone).__name__}; pass in_channels=")
    return conv.in_channels


class Canonicalized(BackboneWrapper):
    """Invariant classifier from ``backbone``: the backbone's logits of the canonical image (one backbone pass).

    The interface of :class:`~gevit_lib.posthoc.PostHoc` where it applies; the net always trains. ``prior_weight``:
    of :meth:`prior_loss` in :meth:`loss` (0 = off); ``temperature``: of the gradient's softmax. Near-ties of the
    scores can flip the pose (docs/posthoc_formulas.md, "Ties").
    """

    def __init__(self, backbone: nn.Module, group: str | Group = "C4", *, in_channels: int | None = None,
                 finetune: str = "none", prior_weight: float = 0.0, temperature: float = 1.0,
                 net_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        backbone_interface(backbone)  # TypeError naming SplitBackbone for anything else
        if prior_weight < 0 or temperature <= 0:
            raise ValueError(f"need prior_weight >= 0 and temperature > 0, got {prior_weight}, {temperature}")
        self.backbone = backbone
        self.net = CanonicalizationNet(group, in_channels or _in_channels(backbone), **(net_options or {}))
        self.group, self.exact = self.net.group, self.net.exact
        self.transforms = TransformStack(self.group, subgroup_exact=not self.exact)
        # copy holding T_{g^-1} x for each element g (the canonical image of pose g)
        inverse = [self.group.inv(g) for g in range(len(self.group))]
        self.register_buffer("copy_of", torch.tensor([self.transforms.elements.index(e) for e in inverse]),
                             persistent=False)
        self.prior_weight, self.temperature = float(prior_weight), float(temperature)
        self.last_scores: Tensor | None = None
        ref = next(backbone.parameters(), None)
        if ref is not None:
            self.net.to(device=ref.device, dtype=ref.dtype)
        self.set_finetune(finetune)

    @property
    def backbone_passes(self) -> int:
        """Backbone passes per input image: one (plus the small net)."""
        return 1

    def learned_modules(self) -> list[nn.Module]:
        return [self.net]

    def canonicalize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Canonical images ``T_{g^-1} x`` ``[B, C, H, W]`` and the chosen elements g ``[B]``; when training with
        gradients, straight-through: ``sum_g w_g T_{g^-1} x``, ``w = onehot + softmax - softmax.detach()``."""
        dtype = self.net.out.weight.dtype
        if x.dim() != 4 or x.shape[0] == 0 or (x.dtype != dtype and not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"expected a non-empty batch of images [B, C, H, W] of the model's dtype {dtype}, got "
                             f"shape {tuple(x.shape)} and dtype {x.dtype}")
        scores = self.last_scores = self.net(x)
        best = scores.argmax(dim=1)
        if self.training and torch.is_grad_enabled():
            soft = torch.softmax(scores / self.temperature, dim=1)
            w = F.one_hot(best, len(self.group)).to(soft) + soft - soft.detach()
            return torch.einsum("bg,bgchw->bchw", w, self.transforms(x)[:, self.copy_of]), best
        return self.transforms.pick(x, self.copy_of[best]), best

    def forward(self, x: Tensor) -> Tensor:
        return self.base_logits(self.canonicalize(x)[0])

    def prior_loss(self) -> Tensor:
        """Mondal et al.'s prior for backbones trained on upright data: cross-entropy of the last forward's scores
        toward the identity element (index 0), so that upright inputs stay upright."""
        s = self.last_scores
        if s is None:
            raise RuntimeError("prior_loss() needs the scores of a forward pass; call the wrapper first")
        return F.cross_entropy(s.float() / self.temperature, torch.zeros(len(s), dtype=torch.long, device=s.device))

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """A ``loss_fn`` for ``train.fit``: cross-entropy, plus ``prior_weight * prior_loss()`` in training mode."""
        out = F.cross_entropy(logits, target)
        if self.training and self.prior_weight:
            out = out + self.prior_weight * self.prior_loss()
        return out

    def extra_repr(self) -> str:
        return (f"group={self.group.name!r} (exact={self.exact}), finetune={self.finetune!r}, "
                f"prior_weight={self.prior_weight}, temperature={self.temperature}")
