"""Faster equivariant ViTs (the post's "modern equivariant ViT"): GE-ViT on a small artificial image that is exactly
invariant to the group's 90-degree rotations (and, with p4m, flips), made by invariant patch embeddings
(:class:`PatchGEViT`) or by an exact G-CNN front end (:class:`HybridGEViT`). docs/architecture.md explains both
and where they deviate from the post. Both have the interface of every model of :mod:`gevit_lib.models`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import Group, get_group
from ..hub import IncompatibleCheckpointError, PublishedWeights
from ..nn.attention import check_impl
from ..nn.gconv import GCNN, GroupPool, check_exact_group
from ._registry import check_batch, register_model
from .gevit import GEViT, GEViTConfig, GroupMaxHead, build_gevit

# GE-ViT on the artificial image (the post's: p4, 20 channels, blocks [2, 3], crop [1, 0, 0, 0, 0], neighbourhood 3,
# 9 heads, LayerNorm, Swish, dropouts 0.1 / 0.1, normalisation between layers, max-pool after block 0 only)
_POST_GEVIT: dict[str, Any] = dict(num_channels=20, num_heads=9, block_sizes=(2, 3), expansion_per_block=(1,),
                                   crop_per_layer=(1, 0, 0, 0, 0), norm="LayerNorm", activation="Swish",
                                   attention_dropout=0.1, value_dropout=0.1, normalize_between_layers=True,
                                   maxpool_after_last_block=False)


def check_exact_pooling(config: GEViTConfig, size: int) -> None:
    """Raise if the network cannot run on ``size`` x ``size`` or max-pools an odd size (which breaks invariance)."""
    for kind, _, _, crop in config.layer_plan():
        if kind == "block":
            size -= 2 * crop
        elif size % 2:
            raise ValueError(f"GE-ViT would max-pool a {size}x{size} map, dropping its last row and column: not "
                             f"rotation invariant. Change crop_per_layer / block_sizes / maxpool_after_last_block "
                             f"(plan {config.layer_plan()})")
        else:
            size //= 2
        if size < 1:
            raise ValueError(f"GE-ViT's crops and poolings (crop_per_layer {list(config.crop_per_layer)}, blocks "
                             f"{list(config.block_sizes)}) do not fit a {size}x{size} input")


def grid_layout(grid: int, num_layers: int = 5, first_block: int = 2, pool_last: bool = False) -> dict[str, Any]:
    """``block_sizes`` / ``crop_per_layer`` / ``maxpool_after_last_block`` for GE-ViT on a ``grid`` x ``grid`` image:
    the post's layout (crop 1 in the first layer, max-pool after the first block) where it fits and pools an even
    map; otherwise no crop (grids < 4) and/or a single block without pooling (odd maps)."""
    if grid < 1 or num_layers < 1:
        raise ValueError(f"grid and num_layers must be >= 1, got {grid}, {num_layers}")
    crop = 1 if grid >= 3 else 0
    crops = (crop,) + (0,) * (num_layers - 1)
    after = grid - 2 * crop
    if 1 <= first_block < num_layers and after % 2 == 0:
        blocks: tuple[int, ...] = (first_block, num_layers - first_block)
        pool_last = pool_last and (after // 2) % 2 == 0 and after // 2 >= 2
    else:
        blocks = (num_layers,)
        pool_last = pool_last and after % 2 == 0 and after >= 2
    return dict(block_sizes=blocks, crop_per_layer=crops, maxpool_after_last_block=pool_last)


def _build_grid_gevit(group: str, in_channels: int, grid: int, attention_patch: int, num_classes: int,
                      options: Mapping[str, Any]) -> GEViT:
    opts = {**_POST_GEVIT, **options}
    if not {"block_sizes", "crop_per_layer"} & set(options):
        opts.update(grid_layout(grid, sum(opts["block_sizes"]), opts["block_sizes"][0],
                                bool(opts["maxpool_after_last_block"])))
    opts.update(in_channels=in_channels, image_size=grid)
    model = build_gevit("rotmnist", group, patch_size=attention_patch, num_classes=num_classes,
                        group_index="corrected", **opts)
    check_exact_pooling(model.config, grid)
    return model


def _check_contains(big: Group, group: Group, what: str) -> None:
    """Raise unless ``big`` contains (as matrices) every exact element of ``group``."""
    for g in group.exact_elements:
        if not bool(((big.matrices - group.matrices[g]).abs().flatten(1).amax(1) < 1e-9).any()):
            raise ValueError(f"{what} {big.name} must contain the exact elements of group {group.name}, otherwise "
                             f"its features are not invariant to them")


class _GridGEViT(nn.Module):
    """GE-ViT on the image made by :meth:`artificial_image`, with the interface of every model."""

    gevit: GEViT

    def artificial_image(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        return self.gevit.num_features

    @property
    def num_classes(self) -> int:
        return self.gevit.num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        return self.gevit.forward_features(self.artificial_image(x))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return self.gevit.forward_head(features, pre_logits)

    def get_classifier(self) -> GroupMaxHead:
        return self.gevit.get_classifier()

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        return self.gevit.forward_intermediates(self.artificial_image(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class InvariantPatchEmbedding(nn.Module):
    """Images ``[B, C, H, W]`` -> artificial image ``[B, D, H/p, W/p]`` of group-invariant patch embeddings:
    ``method="mean"``: ``LayerNorm(mean_{g in G} phi(T_g patch))`` with one shared ``phi`` (a Linear layer, or an MLP
    with ``hidden_dim``); ``"gcnn"``: a small G-CNN on each patch, max over G, mean over the patch, Linear, LayerNorm.
    """

    def __init__(self, in_channels: int, patch_size: int, embed_dim: int, group: Group | str = "p4",
                 method: str = "mean", hidden_dim: int | None = None, gcnn_channels: int = 8, gcnn_layers: int = 2,
                 gcnn_kernel: int = 3, impl: str = "fast") -> None:
        super().__init__()
        if method not in ("mean", "gcnn"):
            raise ValueError(f"embed method must be one of ('mean', 'gcnn'), got {method!r}")
        if min(in_channels, patch_size, embed_dim) < 1:
            raise ValueError(f"in_channels, patch_size and embed_dim must be >= 1, got {in_channels}, {patch_size}, "
                             f"{embed_dim}")
        self.group = check_exact_group(group)
        self.in_channels, self.patch_size, self.embed_dim = in_channels, patch_size, embed_dim
        self.method, self.impl = method, check_impl(impl)
        dim = in_channels * patch_size**2
        if method == "mean" and hidden_dim is None:
            self.phi: nn.Module = nn.Linear(dim, embed_dim)
        elif method == "mean":
            self.phi = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim))
        else:
            self.gcnn = GCNN(self.group, in_channels, gcnn_channels, num_layers=gcnn_layers, kernel_size=gcnn_kernel,
                             padding=gcnn_kernel // 2, bias=True, norm=True, norm_affine=True)
            self.group_pool = GroupPool("max")
            self.phi = nn.Linear(gcnn_channels, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        check_batch(x, self)
        b, _, h, w = x.shape
        n, p = h // self.patch_size, self.patch_size
        if h != w or h % p:
            raise ValueError(f"patch size {p} must divide a square image exactly (otherwise rotations do not map "
                             f"patches to patches), got {h}x{w}")
        if self.method == "mean" and isinstance(self.phi, nn.Linear) and self.impl == "fast":
            # the mean of phi over the copies is phi with the filter averaged over the group: one convolution
            weight = self.phi.weight.view(self.embed_dim, self.in_channels, p, p)
            weight = torch.stack([self.group.act_on_image(weight, g) for g in range(len(self.group))]).mean(0)
            e = F.conv2d(x, weight, self.phi.bias, stride=p).permute(0, 2, 3, 1)  # [B, n, n, D]
        else:
            patches = x.view(b, -1, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(b * n * n, self.in_channels, p, p)
            if self.method == "mean":
                copies = torch.stack([self.group.act_on_image(patches, g) for g in range(len(self.group))], 1)
                e = self.phi(copies.flatten(2)).mean(1)
            else:
                e = self.phi(self.group_pool(self.gcnn(patches)).mean(dim=(-2, -1)))
            e = e.view(b, n, n, self.embed_dim)
        return self.norm(e).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, group={self.group.name}, patch_size={self.patch_size}, "
                f"embed_dim={self.embed_dim}, impl={self.impl!r}")


class PatchGEViT(_GridGEViT):
    """Approach 1: :class:`InvariantPatchEmbedding` -> GE-ViT on the ``(H/p) x (W/p)`` grid. ``patch_group``: the
    transforms averaged inside each patch (default: ``group``; the post used p4m); ``attention_patch``: GE-ViT's
    neighbourhood on the grid; ``gevit``: GE-ViT fields (default: the post's, crops / pooling from
    :func:`grid_layout`)."""

    def __init__(self, group: str = "p4", patch_group: str | None = None, in_channels: int = 1, image_size: int = 28,
                 patch_size: int = 4, embed_dim: int = 64, embed_method: str = "mean", embed_hidden: int | None = None,
                 gcnn_channels: int = 8, gcnn_layers: int = 2, gcnn_kernel: int = 3, attention_patch: int = 3,
                 num_classes: int = 10, gevit: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} must divide the image size {image_size}")
        copies = get_group(patch_group or group)
        _check_contains(copies, get_group(group), "patch_group")
        self.image_size = image_size
        self.embed = InvariantPatchEmbedding(in_channels, patch_size, embed_dim, copies, embed_method, embed_hidden,
                                             gcnn_channels, gcnn_layers, gcnn_kernel)
        self.gevit = _build_grid_gevit(group, embed_dim, image_size // patch_size, attention_patch, num_classes,
                                       gevit or {})

    def artificial_image(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"this model was built for {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        return self.embed(x)

    def set_impl(self, impl: str) -> PatchGEViT:
        """"fast" / "plain" for the embedding (and its G-CNN) and every GE-ViT attention layer."""
        self.embed.impl = check_impl(impl)
        if self.embed.method == "gcnn":
            self.embed.gcnn.set_impl(impl)
        self.gevit.set_impl(impl)
        return self


class HybridGEViT(_GridGEViT):
    """Approach 2 (the post's hybrid): exact G-CNN -> max over the group axis -> adaptive max-pool to ``pooled_size``
    -> GE-ViT. ``gcnn_group`` defaults to ``group``; ``gevit`` overrides GE-ViT fields of the back end (default:
    max-pool after every block, as the post's)."""

    def __init__(self, group: str = "p4", gcnn_group: str | None = None, in_channels: int = 3, image_size: int = 96,
                 gcnn_channels: int = 8, gcnn_layers: int = 8, gcnn_kernel: int = 5, gcnn_padding: int = 0,
                 gcnn_bias: bool = False, pooled_size: int = 6, attention_patch: int = 5, num_classes: int = 2,
                 gevit: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        front_group = check_exact_group(gcnn_group or group)
        _check_contains(front_group, get_group(group), "gcnn_group")
        self.in_channels, self.image_size = in_channels, image_size
        self.gcnn = GCNN(front_group, in_channels, gcnn_channels, num_layers=gcnn_layers, kernel_size=gcnn_kernel,
                         padding=gcnn_padding, bias=gcnn_bias, norm=True, norm_affine=False)
        size = self.gcnn.output_size(image_size)
        if size < pooled_size:
            raise ValueError(f"the G-CNN turns {image_size}x{image_size} images into {size}x{size} maps, smaller than "
                             f"pooled_size={pooled_size}")
        self.group_pool = GroupPool("max")
        self.spatial_pool = nn.AdaptiveMaxPool2d(pooled_size)  # windows symmetric under rot90 / flips
        gevit = {"maxpool_after_last_block": True} if gevit is None else gevit
        self.gevit = _build_grid_gevit(group, gcnn_channels, pooled_size, attention_patch, num_classes, gevit)

    def artificial_image(self, x: Tensor) -> Tensor:
        """The artificial image ``[B, gcnn_channels, pooled_size, pooled_size]`` (invariant G-CNN features)."""
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this model was built for images [B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}], got {tuple(x.shape)}")
        return self.spatial_pool(self.group_pool(self.gcnn(x)))

    def set_impl(self, impl: str) -> HybridGEViT:
        self.gcnn.set_impl(impl)
        self.gevit.set_impl(impl)
        return self


# preset -> the options that differ from the model's defaults
PATCH_PRESETS: dict[str, dict[str, Any]] = {
    # the post's patch model (n_embd 128 as in its code; the post's text says 64)
    "pcam": dict(in_channels=3, image_size=96, patch_size=6, embed_dim=128, num_classes=2),
    "rotmnist": dict(in_channels=1, image_size=28, patch_size=4, embed_dim=64, num_classes=10),
}
HYBRID_PRESETS: dict[str, dict[str, Any]] = {
    # the post's hybrid: 8 layers of 5x5 without padding (96 -> 64), max-pool to 6x6, GE-ViT patch 5, pool after
    # every block
    "pcam": dict(gevit={"maxpool_after_last_block": True}),
    # rotated MNIST: 3 layers (28 -> 16), 2x2 max-pool to 8x8, GE-ViT neighbourhood 3, pool after the first block
    "rotmnist": dict(in_channels=1, image_size=28, gcnn_layers=3, pooled_size=8, attention_patch=3, num_classes=10),
}


def _build(cls: type[nn.Module], presets: Mapping[str, dict[str, Any]], preset: str, group: str,
           num_classes: int | None, gevit: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> Any:
    """``cls`` with the options of ``presets[preset]``, the checked ``overrides``, and ``gevit`` merged into its own."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    fields = set(inspect.signature(cls).parameters) - {"gevit"}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s) {sorted(unknown)}; valid: {sorted(fields)}")
    options = {**presets[preset], **overrides, "group": get_group(group).name}
    if num_classes is not None:
        options["num_classes"] = int(num_classes)
    options["gevit"] = {**presets[preset].get("gevit", {}), **(gevit or {})}
    return cls(**options)


def build_patch_gevit(preset: str = "pcam", group: str = "p4", patch_size: int | None = None,
                      embed_method: str = "mean", num_classes: int | None = None,
                      gevit: Mapping[str, Any] | None = None, **overrides: Any) -> PatchGEViT:
    """A :class:`PatchGEViT` from a preset ("pcam", "rotmnist"); ``overrides`` replace its other options and
    ``gevit`` GE-ViT fields (e.g. ``gevit={"num_channels": 12, "num_heads": 4}``)."""
    fixed: dict[str, Any] = {} if patch_size is None else {"patch_size": int(patch_size)}
    return _build(PatchGEViT, PATCH_PRESETS, preset, group, num_classes, gevit,
                  {**overrides, "embed_method": embed_method, **fixed})


def build_hybrid(preset: str = "pcam", group: str = "p4", num_classes: int | None = None,
                 gevit: Mapping[str, Any] | None = None, **overrides: Any) -> HybridGEViT:
    """A :class:`HybridGEViT` from a preset ("pcam": the post's hybrid; "rotmnist"); ``overrides`` replace its other
    options and ``gevit`` GE-ViT fields."""
    return _build(HybridGEViT, HYBRID_PRESETS, preset, group, num_classes, gevit, overrides)


_ORIGINAL_GCNN_KEYS = ("gcnn.lifting_conv.kernel.weight", "gcnn.gconvs.0.kernel.transformed_grid_R2xH")


def from_original_state_dict(state: Mapping[str, Tensor], **options: Any) -> HybridGEViT:
    """The post's hybrid checkpoints do not map onto this model (their G-CNN interpolates its filters between the
    group elements; docs/published_checkpoints.md): always raises :class:`IncompatibleCheckpointError`."""
    del options
    keys = set(state)
    if not all(k in keys or f"module.{k}" in keys for k in _ORIGINAL_GCNN_KEYS):
        raise IncompatibleCheckpointError("not an original hybrid (G-CNN -> GE-ViT) state dict: missing "
                                          f"{[k for k in _ORIGINAL_GCNN_KEYS if k not in keys]}")
    raise IncompatibleCheckpointError(
        "the published hybrid checkpoint cannot be loaded into HybridGEViT: its G-CNN builds the filters of the "
        "group convolutions by interpolating the stored filter between (and beyond) the 8 group elements "
        "(see gcnn.gconvs.*.kernel.transformed_grid_R2xH), which no exact group convolution reproduces; the "
        "weights would compute a different function. Train HybridGEViT instead (build_hybrid('pcam', ...)).")


# ---- registry: the families and the published hybrid checkpoints ---------------------------------------------------
register_model(build_patch_gevit, name="patch_gevit")
register_model(build_hybrid, name="hybrid_gevit")
_POST_HYBRID = {"preset": "pcam", "group": "p4", "gcnn_group": "p4m"}  # the post's D4 G-CNN with a p4 GE-ViT
for _name, _sha256, _what in (
    ("modern_eq_vit", "7c00bedf323927da72b593e8333219daa7c650894d062a9167f0e580d79044b8",
     "hybrid G-CNN -> GE-ViT on PCam (15 epochs); its G-CNN is not equivariant beyond the lifting layer"),
    ("modern_eq_vit_finetuned", "a68538e49ee6eb4fb845d96f9da11069551dd27427b2403e902bb9ea37073ebb",
     "the hybrid after 2 more epochs"),
):
    _weights = PublishedWeights(_name, f"src/modern_eq_vit/saved/{_name}.pt", _sha256, _what, _POST_HYBRID)
    register_model(build_hybrid, weights=_weights, convert=from_original_state_dict)
