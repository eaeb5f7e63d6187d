"""Post-hoc invariance for any image classifier: run it on every transformed copy of the input, then aggregate.

``PostHoc(backbone, method, group)`` wraps a timm-style classifier, a torchvision ResNet or a :class:`SplitBackbone`;
:class:`TransformStack` builds the copies (exact pixel permutations for C4 / D4), :class:`EmbeddingCache` reuses
their embeddings across methods in the post-hoc notebooks and :func:`load_pcam_cnn` loads experiment 4's PCam CNN.
The methods, and where the original code (``variant="original"``) and the post (``"post"``) differ, are in
docs/posthoc_formulas.md.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gevit_lib.groups import Group, get_group, rotate

__all__ = ["METHODS", "TransformStack", "SplitBackbone", "ScoreAggregator", "AttentionAggregator", "BackboneWrapper",
           "PostHoc", "resolve_method", "aggregate", "has_batchnorm", "shares_embeddings", "EmbeddingCache",
           "CACHED_TRAINING_NOTE", "KEPT_EPOCH_NOTE", "PCAM_BACKBONES", "load_pcam_cnn"]

FINETUNE_MODES = ("none", "head", "model")
CPU_CHUNK = 128  # images per backbone forward on the CPU when max_batch="auto"
VARIANTS = ("original", "post")


@dataclass(frozen=True)
class MethodInfo:
    """A post-hoc method: its key, the post's name, the original class, whether it learns."""

    key: str
    post_name: str
    original_class: str
    learned: bool = False


METHODS: dict[str, MethodInfo] = {m.key: m for m in [
    MethodInfo("mean", "PH Mean Pooling", "PostHocEquivariantMean"),
    MethodInfo("max", "PH Max Pooling", "PostHocEquivariantMax"),
    MethodInfo("sum", "PH Sum Pooling", "PostHocEquivariantSum"),
    MethodInfo("most_probable", "PH Most Likely", "PostHocEquivariantMostProbable"),
    MethodInfo("most_certain", "PH Most Certain", "PostHocMostCertain"),
    MethodInfo("learned_score", "PH Learned Weighted Average", "PostHocLearnedScoreAggregation", learned=True),
    MethodInfo("learned_attention", "PH Learned Attention Aggregation", "PostHocLearnedAggregation", learned=True),
    MethodInfo("tta", "Normal ViT + TTA", "NormalMeanPool"),
]}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_ALIASES = {_norm(alias): m.key for m in METHODS.values() for alias in (m.key, m.post_name, m.original_class)}


def resolve_method(name: str) -> str:
    """The method key for a key, the post's name or the original class name (case and punctuation ignored)."""
    key = _ALIASES.get(_norm(str(name)))
    if key is None:
        raise ValueError(f"unknown post-hoc method {name!r}; choose one of {list(METHODS)}")
    return key


def _commute_with_rot90(sources: Tensor) -> Tensor:
    """Make a nearest-neighbour source map (image of 1-based source pixel numbers, 0 = outside) commute with
    rot90: the value at each output pixel is taken from its rot90-orbit's first pixel and rotated along."""
    h, w = sources.shape[-2:]
    perm = [torch.arange(h * w)]  # perm[k][p]: pixel that rot90^k puts at p
    for _ in range(3):
        perm.append(torch.rot90(perm[-1].reshape(h, w), 1, dims=(0, 1)).reshape(-1))
    powers = torch.stack(perm)  # [4, H*W]: the orbit of each pixel
    k, rep = powers.argmin(0), powers.min(0).values
    src_rep = (sources.reshape(-1).round().long() - 1)[rep]
    out = torch.where(src_rep < 0, src_rep, powers[(4 - k) % 4, src_rep.clamp(min=0)])
    return (out + 1).to(sources.dtype).reshape(sources.shape)


# Index maps, not groups.rotate per batch: rotating an image of pixel numbers once per size gives exactly the
# original's nearest-neighbour source pixels; afterwards a batch needs one gather for all T copies.
class TransformStack:
    """The copies ``[B, T, C, H, W]`` of a batch, as the original ``get_transforms``: identity, CCW rotations by
    ``i * 360 / n`` degrees (nearest; exposed corners = ``fill``, 0 = the normalised mean), then their horizontal
    flips for dihedral groups.

    ``subgroup_exact``: the original samples each angle on its own grid, so a C16 wrapper is not exactly invariant
    even to rot90 (0.21 on logits in the parity reference); True builds the copy at ``a + 90 k`` as
    ``rot90(copy at a, k)``, exactly invariant to C4 (cyclic groups C_4m).
    """

    def __init__(self, group: str | Group, fill: float = 0.0, subgroup_exact: bool = False) -> None:
        self.group = get_group(group)
        self.fill = float(fill)
        n = self.group.n_rotations
        if subgroup_exact and self.group.mirror and n > 4:
            raise ValueError(f"subgroup_exact is implemented for cyclic groups C_4m (and is automatic for D4), "
                             f"not for {self.group.name}")
        self.subgroup_exact = bool(subgroup_exact) and n % 4 == 0
        # stack index -> (rotation steps CCW, flipped)
        self.steps = [(i, False) for i in range(n)] + ([(i, True) for i in range(n)] if self.group.mirror else [])
        # group element of each copy (groups.py turns element (1, 0) clockwise; see Group docstring)
        self.elements = [self.group.index(-i, int(f)) for i, f in self.steps]
        self._maps: dict[tuple[int, int, str], Tensor] = {}

    def __len__(self) -> int:
        return len(self.steps)

    def index_map(self, h: int, w: int) -> Tensor:
        """int64 ``[T, H*W]``: source pixel of each output pixel of each copy (``H*W`` = the fill value); exact
        copies from ``torch.rot90`` / ``flip``, the others from torchvision's nearest ``rotate`` (float32 grid)."""
        if h * w + 1 >= 2**24:
            raise ValueError(f"image {h}x{w} too large for a float32 index map")
        n = self.group.n_rotations
        numbers = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, 1, h, w)  # 0 = outside
        maps = []
        for i, flipped in self.steps:
            quarter, rest = 0, i  # quarter turns done by rot90, remaining steps sampled on a grid
            if 4 * i % n == 0:
                quarter, rest = 4 * i // n, 0
            elif self.subgroup_exact:
                quarter, rest = divmod(i, n // 4)
            if quarter % 2 and h != w:
                raise ValueError(f"a 90-degree rotation of a non-square {h}x{w} image is not a symmetry")
            img = numbers
            if rest:
                img = rotate(img, rest * 360.0 / n, interpolation="nearest")
                if self.subgroup_exact:
                    img = _commute_with_rot90(img)
            if quarter:
                img = rotate(img, 90.0 * quarter)  # exact: torch.rot90
            if flipped:
                img = torch.flip(img, dims=(-1,))
            maps.append(img.reshape(-1))
        idx = torch.stack(maps).round().long() - 1
        return torch.where(idx < 0, torch.full_like(idx, h * w), idx)

    def _source(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The flattened images with the fill value appended ``[B, C, H*W + 1]``, and the index map of their size."""
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        key = (h, w, str(x.device))
        if key not in self._maps:
            self._maps[key] = self.index_map(h, w).to(x.device)
        return torch.cat([x.reshape(b, c, h * w), x.new_full((b, c, 1), self.fill)], dim=-1), self._maps[key]

    def pick(self, x: Tensor, copy: Tensor) -> Tensor:
        """Copy ``copy[b]`` of each image ``[B, C, H, W]``: ``self(x)[arange(B), copy]`` in one gather."""
        padded, idx = self._source(x)
        b, c, h, w = x.shape
        return padded.gather(2, idx[copy][:, None].expand(b, c, -1)).view(b, c, h, w)

    def __call__(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, T, C, H, W]`` on ``x``'s device and dtype, one gather for every copy."""
        padded, idx = self._source(x)
        b, c, h, w = x.shape
        return padded[:, :, idx].transpose(1, 2).reshape(b, len(self), c, h, w)


class SplitBackbone(nn.Module):
    """A classifier as ``features`` (images -> embeddings ``[N, D]``) and ``head``, with the timm-style interface."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def backbone_interface(model: nn.Module) -> str:
    """"timm" (forward_features / forward_head(pre_logits=True) / get_classifier) or "torchvision_resnet"."""
    if all(callable(getattr(model, a, None)) for a in ("forward_features", "forward_head", "get_classifier")):
        return "timm"
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer4", "avgpool", "fc")) and isinstance(
            model.fc, nn.Linear):
        return "torchvision_resnet"
    raise TypeError(f"{type(model).__name__} exposes neither the timm interface (forward_features, "
                    f"forward_head(pre_logits=True), get_classifier) nor a torchvision ResNet's (conv1 ... layer4, "
                    f"avgpool, fc); wrap it as SplitBackbone(features, head)")


def backbone_embed(model: nn.Module, x: Tensor) -> Tensor:
    """The embedding ``[N, D]`` that the head maps to logits (timm: ``pre_logits``; ResNet: pooled features)."""
    m: Any = model
    if backbone_interface(model) == "timm":
        return m.forward_head(m.forward_features(x), pre_logits=True)
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return torch.flatten(m.avgpool(x), 1)


def backbone_head(model: nn.Module) -> nn.Module:
    """The module mapping :func:`backbone_embed` to logits (``get_classifier()``, or ``fc`` for ResNets)."""
    m: Any = model
    return m.get_classifier() if backbone_interface(model) == "timm" else m.fc


class ScoreAggregator(nn.Module):
    """Learned weighted average: ``w_t = Linear(D, hidden) -> GELU -> Linear(hidden, 1)`` of each embedding, divided
    by their sum (``variant="original"``) or softmaxed over the copies (``"post"``)."""

    def __init__(self, dim: int, hidden: int = 128, variant: str = "original") -> None:
        super().__init__()
        self.variant = variant
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def weights(self, e: Tensor) -> Tensor:
        """``[B, T, D]`` -> normalised weights ``[B, T, 1]``."""
        w = self.fc(e)
        return torch.softmax(w, dim=1) if self.variant == "post" else w / w.sum(dim=1, keepdim=True)

    def forward(self, e: Tensor) -> Tensor:
        return (e * self.weights(e)).sum(dim=1)


class _AttentionOnlyBlock(nn.Module):
    """The original aggregator block: ``x + MHA1(LN1(x))``, then ``LN2`` and ReLU without residual, ``+ MHA2``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(dim)
        self.attn1 = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.layer_norm_2 = nn.LayerNorm(dim)
        self.act = nn.ReLU()
        self.attn2 = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """The block's output and (with ``need_weights``) both layers' head-averaged attention ``[B, L, L]``."""
        h = self.layer_norm_1(x)
        a, w1 = self.attn1(h, h, h, need_weights=need_weights)
        x = self.act(self.layer_norm_2(x + a))
        a, w2 = self.attn2(x, x, x, need_weights=need_weights)
        return x + a, [w1, w2]


class AttentionAggregator(nn.Module):
    """Learned attention aggregation: a CLS token prepended to the T embeddings (no positional encoding), then
    ``num_layers`` attention-only blocks; returns the CLS output."""

    def __init__(self, dim: int, num_heads: int = 4, num_layers: int = 2) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} must be divisible by num_heads={num_heads}")
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = nn.ModuleList(_AttentionOnlyBlock(dim, num_heads) for _ in range(num_layers))

    def _run(self, e: Tensor, need_weights: bool) -> tuple[Tensor, list[Tensor]]:
        x, maps = torch.cat([self.cls_token.expand(e.shape[0], -1, -1).to(e.dtype), e], dim=1), []
        for block in self.transformer:
            x, w = block(x, need_weights)
            maps += w
        return x, maps

    def forward(self, e: Tensor) -> Tensor:
        return self._run(e, False)[0][:, 0]

    def attention_maps(self, e: Tensor) -> list[Tensor]:
        """Attention weights of every layer, ``[B, 1 + T, 1 + T]`` each (token 0 = CLS), for visualisation."""
        return self._run(e, True)[1]


def aggregate(method: str, embeddings: Tensor, head: nn.Module, variant: str = "original",
              aggregator: nn.Module | None = None) -> Tensor:
    """Logits ``[B, K]`` from per-copy embeddings ``[B, T, D]`` (docs/posthoc_formulas.md)."""
    method = resolve_method(method)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    e = embeddings
    if method == "mean":
        return head(e.mean(dim=1))
    if method == "max":
        return head(e.amax(dim=1))
    if method == "sum":
        return head(e.sum(dim=1)) if variant == "original" else head(e).sum(dim=1)
    if method in ("learned_score", "learned_attention"):
        if aggregator is None:
            raise ValueError(f"method {method!r} needs its aggregator module")
        return head(aggregator(e))
    z = head(e)  # [B, T, K] logits of every copy
    if method == "tta":
        return z.mean(dim=1)
    if method == "most_probable":
        t = z.shape[1]
        if variant == "post":
            return torch.log_softmax(z, dim=-1).sum(dim=1)
        if t < 2:
            raise ValueError("most_probable (variant 'original') divides by T // 2 and needs at least 2 copies")
        log_prod = torch.log_softmax(z / (t // 2), dim=-1).sum(dim=1)  # log prod_t p_t, no underflow
        p = torch.softmax(log_prod, dim=-1)  # prod / sum_c prod
        eps = 1e-8
        return torch.log((p + eps) / (1 - p + eps))
    if method == "most_certain":
        probs = torch.softmax(z, dim=-1)
        if variant == "original":
            best = probs.argmax(dim=1, keepdim=True)  # [B, 1, K]: per class, the copy most sure of it
            return torch.gather(z, 1, best).squeeze(1)
        best_t = probs.amax(dim=-1).argmax(dim=1)  # [B]: the copy holding the highest probability
        return z[torch.arange(z.shape[0], device=z.device), best_t]
    raise AssertionError(method)  # pragma: no cover


class BackboneWrapper(nn.Module):
    """What :class:`PostHoc` and ``canonical.Canonicalized`` share: backbone, head, copies, freezing, plain logits."""

    backbone: nn.Module
    transforms: TransformStack
    finetune: str

    @property
    def head(self) -> nn.Module:
        """The backbone's head (looked up each time so copies of the wrapper stay consistent)."""
        return backbone_head(self.backbone)

    @property
    def num_transforms(self) -> int:
        return len(self.transforms)

    def learned_modules(self) -> list[nn.Module]:
        """Modules that train in every finetune mode (a learned aggregator, a canonicalization net)."""
        return []

    def set_finetune(self, mode: str) -> BackboneWrapper:
        """Freeze by ``requires_grad``: "none" (backbone and head), "head" (head trains), "model" (nothing frozen);
        :meth:`learned_modules` always train."""
        if mode not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune mode {mode!r}; choose one of {FINETUNE_MODES}")
        self.finetune = mode
        self.backbone.requires_grad_(mode == "model")
        if mode == "head":
            self.head.requires_grad_(True)
        for module in self.learned_modules():
            module.requires_grad_(True)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def base_logits(self, x: Tensor) -> Tensor:
        """The backbone's own logits (no transforms)."""
        return self.head(backbone_embed(self.backbone, x))


class PostHoc(BackboneWrapper):
    """Invariant classifier from ``backbone``: aggregate its outputs over the group's transformed copies.

    ``method``: a key of :data:`METHODS` (or the post's / original class name); ``group``: a name such as "C16" or
    "D4" or a :class:`~gevit_lib.groups.Group`; ``variant``: "original" (the code) or "post"; ``fill``,
    ``subgroup_exact``: see :class:`TransformStack`. ``max_batch``: chunk size of the ``B*T`` backbone batch; None:
    one forward; "auto": one forward on accelerators, chunks of :data:`CPU_CHUNK` on the CPU (the post's ViT runs a
    third slower per image in CPU batches of 256-512). ``train()`` puts the whole wrapper in training mode as the
    original did (a frozen backbone's dropout is on).
    """

    def __init__(self, backbone: nn.Module, method: str, group: str | Group = "C16", *, variant: str = "original",
                 fill: float = 0.0, subgroup_exact: bool = False, finetune: str = "none",
                 max_batch: int | str | None = "auto", embed_dim: int | None = None,
                 aggregator_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.method = resolve_method(method)
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
        if not (max_batch is None or max_batch == "auto" or (isinstance(max_batch, int) and max_batch >= 1)):
            raise ValueError(f"max_batch must be an int >= 1, None or 'auto', got {max_batch!r}")
        backbone_interface(backbone)  # TypeError naming SplitBackbone for anything else
        self.backbone, self.variant, self.max_batch = backbone, variant, max_batch
        self.transforms = TransformStack(group, fill=fill, subgroup_exact=subgroup_exact)
        self.group = self.transforms.group
        self.embed_dim = embed_dim or _embedding_dim(backbone, self.head)
        self.aggregator: nn.Module | None = None
        if METHODS[self.method].learned:
            dim = self.embed_dim
            if dim is None:
                raise ValueError(f"cannot tell the embedding size of {type(backbone).__name__}; pass embed_dim=")
            opts = aggregator_options or {}
            self.aggregator = (ScoreAggregator(dim, variant=variant, **opts) if self.method == "learned_score"
                               else AttentionAggregator(dim, **opts))
            ref = next(backbone.parameters(), None)
            if ref is not None:
                self.aggregator.to(device=ref.device, dtype=ref.dtype)
        self.set_finetune(finetune)

    @property
    def backbone_passes(self) -> int:
        """Backbone passes per input image: one per transformed copy (the cost tables' ``passes``)."""
        return len(self.transforms)

    def learned_modules(self) -> list[nn.Module]:
        return [] if self.aggregator is None else [self.aggregator]

    def _check_input(self, x: Tensor, what: str, expected: str, reference: nn.Module) -> None:
        """Clear errors for the inputs torch would reject deep inside (or misread): empty batches, wrong dtypes."""
        if x.shape[0] == 0:
            raise ValueError(f"empty batch: PostHoc needs {what} {expected} with B >= 1, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point {what} {expected}, got dtype {x.dtype}; convert with "
                            f"x.float() (and normalise as the backbone expects)")
        ref = next((p for p in reference.parameters() if p.is_floating_point()), None)
        if ref is not None and x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{what} have dtype {x.dtype} but the model's parameters {ref.dtype}; convert one of "
                            f"them (x.to({ref.dtype}) or model.to({x.dtype}))")

    def transformed_embeddings(self, x: Tensor) -> Tensor:
        """Embeddings of every transformed copy ``[B, T, D]``: one batched backbone forward on ``x``'s device."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch of images [B, C, H, W], got shape {tuple(x.shape)}"
                             + ("; add the batch dimension with x[None]" if x.dim() == 3 else ""))
        self._check_input(x, "images", "[B, C, H, W]", self.backbone)
        stack = self.transforms(x)  # [B, T, C, H, W]
        b, t = stack.shape[:2]
        flat = stack.reshape(b * t, *stack.shape[2:])
        chunk = self.max_batch
        if chunk == "auto":
            chunk = CPU_CHUNK if x.device.type == "cpu" else None
        parts = [flat] if chunk is None or b * t <= chunk else flat.split(int(chunk))
        return torch.cat([backbone_embed(self.backbone, part) for part in parts]).reshape(b, t, -1)

    def aggregate(self, embeddings: Tensor) -> Tensor:
        """Logits from per-copy embeddings ``[B, T, D]`` (lets several methods share one backbone pass)."""
        return aggregate(self.method, embeddings, self.head, self.variant, self.aggregator)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, K]`` from images ``[B, C, H, W]`` or from this wrapper's per-copy embeddings ``[B, T, D]``
        (:meth:`transformed_embeddings`); an unbatched image ``[C, H, W]`` is an error."""
        if x.dim() == 3:
            if x.shape[1] != self.num_transforms or (self.embed_dim is not None and x.shape[2] != self.embed_dim):
                raise ValueError(
                    f"expected a batch of images [B, C, H, W] or precomputed embeddings [B, T={self.num_transforms}, "
                    f"D={self.embed_dim or '?'}] (group {self.group.name}), got shape {tuple(x.shape)}; an "
                    f"unbatched image [C, H, W] needs the batch dimension: x[None]")
            self._check_input(x, "embeddings", "[B, T, D]", self.head)
            return self.aggregate(x)
        return self.aggregate(self.transformed_embeddings(x))

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, group={self.group.name!r} (T={self.num_transforms}), "
                f"variant={self.variant!r}, finetune={self.finetune!r}")


def _embedding_dim(backbone: nn.Module, head: nn.Module) -> int | None:
    for attr in ("num_features", "embed_dim"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int):
            return value
    first = next((m for m in head.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))), None)
    if isinstance(first, nn.Linear):
        return first.in_features
    return int(first.normalized_shape[0]) if isinstance(first, nn.LayerNorm) else None


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` keeps BatchNorm running statistics (training mode changes them even when frozen)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def shares_embeddings(wrapper: PostHoc, trains: bool) -> bool:
    """True when an :class:`EmbeddingCache` may stand in for the images: nothing trains, or only the head /
    aggregator does and the backbone has no BatchNorm statistics that training mode would update."""
    return not trains or (wrapper.finetune != "model" and not has_batchnorm(wrapper.backbone))


# what the post-hoc tables say about their finetuning, where it differs from the original's
CACHED_TRAINING_NOTE = ("finetuned on cached embeddings of the un-augmented training digits, backbone dropout off "
                        "(the original: randomly rotated digits, dropout on)")
KEPT_EPOCH_NOTE = ("the finetuning epoch kept by validation accuracy; 0: no epoch beat the untouched model, whose "
                   "weights were kept (the original kept the last epoch)")


class EmbeddingCache:
    """Per-copy embeddings ``[N, T, D]`` (CPU, float32) and labels of fixed datasets, each copy computed once.

    ``cache(wrapper, "test")`` stands in for the test images where :func:`shares_embeddings` is true (:class:`PostHoc`
    accepts embeddings). ``data``: split name -> Dataset or ``(inputs, labels)``, never changed afterwards. Each copy
    is stored under a fingerprint of the backbone's embedding weights (not its head), the split's data and the
    copy's pixels, so groups that share copies share embeddings (D4's rotations are C16's copies 0, 4, 8, 12);
    ``directory``: also saved there per (split, copy), so an interrupted run resumes and a change is recomputed.
    """

    def __init__(self, data: dict[str, Any], batch_size: int = 128, device: str | torch.device = "cpu",
                 progress: bool = False, directory: str | os.PathLike[str] | None = None) -> None:
        self.data, self.batch_size, self.device, self.progress = data, batch_size, torch.device(device), progress
        self.directory = Path(directory) if directory is not None else None
        self._copies: dict[str, Tensor] = {}  # fingerprint -> [N, D]
        self._labels: dict[str, Tensor] = {}
        self._data_fp: dict[str, str] = {}
        self._store: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}  # assembled [N, T, D] per split and copies

    def _loader(self, split: str) -> Any:
        from torch.utils.data import DataLoader, TensorDataset

        data = self.data[split]
        return DataLoader(TensorDataset(*data) if isinstance(data, tuple) else data, batch_size=self.batch_size,
                          shuffle=False)

    def _data_fingerprint(self, split: str) -> str:
        if split not in self._data_fp:
            h, labels = hashlib.sha1(), []
            for x, y in self._loader(split):
                h.update(x.float().contiguous().numpy().tobytes())
                labels.append(y)
            self._labels[split] = torch.cat(labels)
            self._data_fp[split] = h.hexdigest() + hashlib.sha1(self._labels[split].numpy().tobytes()).hexdigest()
        return self._data_fp[split]

    def copy_fingerprints(self, wrapper: PostHoc, split: str) -> list[str]:
        """One fingerprint per transformed copy of ``wrapper``: backbone (without head) + data + copy pixels."""
        h = hashlib.sha1(self._data_fingerprint(split).encode())
        head = {id(t) for t in [*wrapper.head.parameters(), *wrapper.head.buffers()]}
        for name, t in wrapper.backbone.state_dict(keep_vars=True).items():
            if id(t) not in head:
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode() + t.detach().float().cpu().numpy().tobytes())
        probe = torch.rand((1, *self.data[split][0][0].shape), generator=torch.Generator().manual_seed(0))
        copies = wrapper.transforms(probe)[0]  # the copy's pixels: index map and fill in one
        fps = []
        for c in copies:
            one = h.copy()
            one.update(c.numpy().tobytes())
            fps.append(one.hexdigest())
        return fps

    def _file(self, split: str, fp: str) -> Path | None:
        return self.directory / f"{split}-{fp[:24]}.pt" if self.directory is not None else None

    def _load(self, split: str, fp: str) -> Tensor | None:
        path = self._file(split, fp)
        if path is None or not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") != fp or len(saved["embeddings"]) != len(self._labels[split]):
            return None  # another computation's file: recompute (and overwrite)
        return saved["embeddings"]

    @torch.no_grad()
    def __call__(self, wrapper: PostHoc, split: str) -> tuple[Tensor, Tensor]:
        from tqdm import tqdm

        from gevit_lib.files import atomic_torch_save

        fps = self.copy_fingerprints(wrapper, split)
        key = (split, *fps)
        if key in self._store:
            return self._store[key]
        for fp in fps:
            if fp not in self._copies and (e := self._load(split, fp)) is not None:
                self._copies[fp] = e
        todo = [t for t, fp in enumerate(fps) if fp not in self._copies and fps.index(fp) == t]  # repeats once
        if todo:
            wrapper.eval().to(self.device)
            loader = self._loader(split)
            bar = tqdm(total=len(todo) * len(loader), leave=False, disable=not self.progress,
                       desc=f"{split} embeddings {wrapper.group.name} ({len(todo)} of {len(fps)} copies new)")
            for t in todo:  # one copy at a time, saved when done: an interrupted run loses at most one copy
                out = []
                for x, _ in loader:
                    copy = wrapper.transforms.pick(x.to(self.device), torch.full((len(x),), t, device=self.device))
                    out.append(backbone_embed(wrapper.backbone, copy).float().cpu())
                    bar.update()
                self._copies[fps[t]] = torch.cat(out)
                if (path := self._file(split, fps[t])) is not None:
                    atomic_torch_save({"fingerprint": fps[t], "embeddings": self._copies[fps[t]]}, path)
            bar.close()
        self._store[key] = (torch.stack([self._copies[fp] for fp in fps], dim=1), self._labels[split])
        return self._store[key]


# name -> Hugging Face repo (timm "hf-hub:" models). The post names the ResNet-50; its code loaded the DenseNet-161.
PCAM_BACKBONES: dict[str, str] = {
    "densenet161.tiatoolbox-pcam": "1aurent/densenet161.tiatoolbox-pcam",
    "resnet50.tiatoolbox-pcam": "1aurent/resnet50.tiatoolbox-pcam",
}


def load_pcam_cnn(name: str = "densenet161.tiatoolbox-pcam",
                  weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """The TIAToolbox PCam CNN through timm: ``hf-hub:1aurent/<name>`` (Hugging Face cache or download), or the
    architecture with a local ``weights`` file of that repo; missing weights raise ``MissingFileError``."""
    import timm

    from gevit_lib.files import MissingFileError

    if name not in PCAM_BACKBONES:
        raise ValueError(f"unknown PCam backbone {name!r}; choose one of {list(PCAM_BACKBONES)}")
    repo = PCAM_BACKBONES[name]
    how_to = (f"Download the weights of https://huggingface.co/{repo} (e.g. `huggingface-cli download {repo}`, "
              f"which fills the Hugging Face cache), or pass weights=<path to its model.safetensors>.")
    if weights is not None:
        from gevit_lib.hub import load_into

        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingFileError(f"PCam CNN weights {path} not found. {how_to}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model(name.split(".")[0], pretrained=False, num_classes=2)
        return load_into(model, state, source=str(path)).eval()
    try:
        return timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()
    except Exception as exc:  # offline, hub errors, missing huggingface_hub
        raise MissingFileError(f"could not load the PCam CNN {name} from the Hugging Face hub ({exc}). {how_to}") \
            from exc
