"""GE-ViT / GSA-Net models (the original ``GroupTransformer``), their presets, and the converter and registration
of the published GE-ViT checkpoints (``create_model("gevit_p4sa_patch5_rotmnist", pretrained=True)``).

``build_gevit(preset, group, ...)`` builds the GE-ViT paper's rotMNIST, PCam and CIFAR-10 architectures for any
group; docs/architecture.md describes the network and where it deviates from the original.
"""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import GROUP_NAMES, Group, get_group
from ..hub import IncompatibleCheckpointError, PublishedWeights, load_into
from ..nn.attention import GroupSelfAttention, LiftingSelfAttention, Pointwise, check_impl
from ..nn.positional import GROUP_INDEX, group_index_table, relative_coordinates
from ._registry import check_batch, register_model


@dataclass(frozen=True)
class GEViTConfig:
    """Every hyper-parameter of a GE-ViT/GSA-Net model (names follow the original ``GroupTransformer``)."""

    group: str = "p4"
    in_channels: int = 1
    num_channels: int = 20
    num_heads: int = 9
    block_sizes: tuple[int, ...] = (2, 3)
    expansion_per_block: tuple[int, ...] = (1,)  # one value = the same for every block
    crop_per_layer: tuple[int, ...] = (2, 0, 2, 1, 1)  # one value = the same for every layer
    image_size: int = 28
    patch_size: int | None = 5  # None = global attention
    num_classes: int = 10
    norm: str = "LayerNorm"  # or "BatchNorm"
    activation: str = "Swish"  # or "ReLU"
    attention_dropout: float = 0.1
    value_dropout: float = 0.1
    input_dropout: float = 0.0
    pool_dropout: float = 0.0
    normalize_between_layers: bool = False
    maxpool_after_last_block: bool = False
    whitening_scale: float = 1.41421356
    positional: str = "gevit"
    group_index: str = "corrected"
    impl: str = "fast"

    def __post_init__(self) -> None:
        sizes = {k: getattr(self, k) for k in ("in_channels", "num_channels", "num_heads", "image_size", "num_classes")}
        sizes.update({"patch_size": self.patch_size} if self.patch_size is not None else {})
        for key in ("block_sizes", "expansion_per_block", "crop_per_layer"):
            sizes.update({f"{key}[{i}]": v for i, v in enumerate(getattr(self, key))})
        for key, value in sizes.items():
            least = 0 if "[" in key else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"GEViTConfig.{key} must be an integer >= {least}, got {value!r}")
        for key in ("attention_dropout", "value_dropout", "input_dropout", "pool_dropout"):
            p = getattr(self, key)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"GEViTConfig.{key} is a probability in [0, 1), got {p!r}")

    def layer_plan(self) -> list[tuple[str, int, int, int]]:
        """``("block", in, out, crop)`` / ``("pool", c, c, 0)`` entries in network order (after the lifting)."""
        n_layers, n_blocks = sum(self.block_sizes), len(self.block_sizes)
        crops = list(self.crop_per_layer) * (n_layers if len(self.crop_per_layer) == 1 else 1)
        expansions = list(self.expansion_per_block) * (n_blocks if len(self.expansion_per_block) == 1 else 1)
        if len(crops) != n_layers:
            raise ValueError(f"crop_per_layer has {len(self.crop_per_layer)} values, the blocks have {n_layers} layers")
        if len(expansions) != n_blocks:
            raise ValueError(f"expansion_per_block has {len(self.expansion_per_block)} values for {n_blocks} blocks")
        plan, c_in, layer = [], self.num_channels, 0
        for b, size in enumerate(self.block_sizes):
            c_out = c_in * (expansions[b] or 1)
            for _ in range(size):
                plan.append(("block", c_in, c_out, crops[layer]))
                c_in, layer = c_out, layer + 1
            if b < n_blocks - 1 or self.maxpool_after_last_block:
                plan.append(("pool", c_in, c_in, 0))
        return plan

    def output_size(self, size: int) -> int:
        """Spatial size after the network's crops and poolings for an input of ``size`` (0: too small)."""
        for kind, _, _, crop in self.layer_plan():
            size = size - 2 * crop if kind == "block" else size // 2
            if size < 1:
                return 0
        return size


PRESETS: dict[str, GEViTConfig] = {
    # the GE-ViT paper's architectures; heads 9 everywhere; patch size from the build call
    "rotmnist": GEViTConfig(),
    "pcam": GEViTConfig(in_channels=3, num_channels=12, block_sizes=(0, 1, 2, 1), expansion_per_block=(1, 2, 2, 2),
                        crop_per_layer=(0, 2, 1, 1), image_size=96, num_classes=2, normalize_between_layers=True,
                        maxpool_after_last_block=True),
    "cifar10": GEViTConfig(in_channels=3, num_channels=96, block_sizes=(2, 2, 2), expansion_per_block=(1, 2, 1),
                           crop_per_layer=(0,), image_size=32, num_classes=10, value_dropout=0.0, input_dropout=0.2,
                           pool_dropout=0.3, normalize_between_layers=True),
}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "LayerNorm":  # over (C, G, H, W) per sample, per-channel affine (the original's LayerNorm)
        return nn.GroupNorm(1, channels, eps=1e-12)
    if kind == "BatchNorm":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"norm must be 'LayerNorm' or 'BatchNorm', got {kind!r}")


def _activation(kind: str) -> nn.Module:
    if kind not in ("Swish", "ReLU"):
        raise ValueError(f"activation must be 'Swish' or 'ReLU', got {kind!r}")
    return nn.SiLU() if kind == "Swish" else nn.ReLU()


class TransformerBlock(nn.Module):
    """``out = crop(A(x)) + crop(shortcut(x)); out = MLP(out) + out`` with A = norm, act, attention, norm, act,
    dropout and MLP = 1x1 (C -> C/2), norm, act, 1x1 (C/2 -> C), norm (the original's block)."""

    def __init__(self, attention: GroupSelfAttention, in_channels: int, out_channels: int, crop: int, norm: str,
                 activation: str, value_dropout: float) -> None:
        super().__init__()
        self.crop = crop
        self.norm_in = _norm(norm, in_channels)
        self.act = _activation(activation)
        self.attn = attention
        self.norm_out = _norm(norm, out_channels)
        self.dropout = nn.Dropout(value_dropout)
        self.mlp_in = Pointwise(out_channels, out_channels // 2)
        self.mlp_norm = _norm(norm, out_channels // 2)
        self.mlp_out = Pointwise(out_channels // 2, out_channels)
        self.mlp_norm_out = _norm(norm, out_channels)
        self.shortcut = Pointwise(in_channels, out_channels) if in_channels != out_channels else nn.Identity()

    def _crop(self, x: Tensor) -> Tensor:
        c = self.crop
        return x[..., c:x.shape[-2] - c, c:x.shape[-1] - c] if c else x

    def forward(self, x: Tensor) -> Tensor:
        a = self.dropout(self.act(self.norm_out(self.attn(self.act(self.norm_in(x))))))
        out = self._crop(a) + self._crop(self.shortcut(x))
        mlp = self.mlp_norm_out(self.mlp_out(self.act(self.mlp_norm(self.mlp_in(out)))))
        return mlp + out


class GEViT(nn.Module):
    """GE-ViT (``positional="gevit"``) or GSA-Net (``"gsa"``) for images ``[B, C, H, W]``; logits ``[B, classes]``."""

    def __init__(self, config: GEViTConfig) -> None:
        super().__init__()
        if config.group_index not in GROUP_INDEX:  # (positional and impl: checked by the attention layers)
            raise ValueError(f"group_index must be one of {GROUP_INDEX}, got {config.group_index!r}")
        self.config = config
        self.group: Group = get_group(config.group)
        c = c_out = config.num_channels
        local = config.patch_size is not None
        common = dict(num_heads=config.num_heads, patch_size=config.patch_size, positional=config.positional,
                      attention_dropout=config.attention_dropout, impl=config.impl)
        size = config.image_size
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.lift = LiftingSelfAttention(self.group, config.in_channels, c, mid_channels=c // 2,
                                         image_size=None if local else size, **common)
        self.lift_norm = _norm(config.norm, c)
        self.lift_act = _activation(config.activation)
        layers: list[nn.Module] = []
        for kind, c_in, c_out, crop in config.layer_plan():
            if kind == "pool":
                layers.append(nn.MaxPool3d((1, 2, 2), (1, 2, 2)))
                if config.pool_dropout > 0:
                    layers.append(nn.Dropout(config.pool_dropout))
                size //= 2
                continue
            attn = GroupSelfAttention(self.group, c_in, c_out, mid_channels=c_out // 2,
                                      image_size=None if local else size, group_index=config.group_index, **common)
            layers.append(TransformerBlock(attn, c_in, c_out, crop, config.norm, config.activation,
                                           config.value_dropout))
            if config.normalize_between_layers:
                layers += [_norm(config.norm, c_out), _activation(config.activation)]
            size -= 2 * crop
        layers.append(Pointwise(c_out, config.num_classes, bias=False))  # the classifier, blocks[-1]
        self.blocks = nn.Sequential(*layers)
        for m in self.modules():  # the original's init: 1x1 maps, positional MLPs ~ N(0, scale^2 / fan_in), biases 0
            if isinstance(m, (Pointwise, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, config.whitening_scale * m.weight.shape[1] ** -0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def attention_layers(self) -> list[LiftingSelfAttention | GroupSelfAttention]:
        """The lifting layer followed by every group self-attention layer, in network order."""
        return [self.lift] + [m.attn for m in self.blocks if isinstance(m, TransformerBlock)]

    def set_impl(self, impl: str) -> GEViT:
        """Switch every attention layer to the "fast" or "plain" implementation."""
        for layer in self.attention_layers():
            layer.impl = check_impl(impl)
        return self

    @property
    def feature_side(self) -> str:
        """How the group axis of the features transforms: "right" (GE-ViT) or "left" (GSA-Nets)."""
        return self.lift.feature_side

    @property
    def num_features(self) -> int:
        """Size of the ``pre_logits`` embedding: channels before the classifier times the group size."""
        return self.blocks[-1].in_channels * len(self.group)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def check_input(self, x: Tensor) -> None:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"GEViT expects images [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        check_batch(x, self)
        h, w = x.shape[-2:]
        if self.group.n_rotations > 1 and h != w:
            raise ValueError(f"group {self.group.name} contains rotations: images must be square, got {h}x{w}")
        if cfg.patch_size is None and (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"this global-attention model was built for {cfg.image_size}x{cfg.image_size} images, "
                             f"got {h}x{w}")
        if cfg.output_size(min(h, w)) < 1:
            least = next(s for s in itertools.count(1) if cfg.output_size(s) >= 1)
            raise ValueError(f"a {h}x{w} image is smaller than the network's crops and poolings need: at least "
                             f"{least}x{least} (crops {list(cfg.crop_per_layer)}, blocks {list(cfg.block_sizes)})")

    def lifted(self, x: Tensor) -> Tensor:
        """Input to ``blocks``: activation(norm(lifting(dropout(x))))."""
        self.check_input(x)
        return self.lift_act(self.lift_norm(self.lift(self.input_dropout(x))))

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Output of every module of ``blocks`` (the original's ``show_features``), each ``[B, C, G, H, W]``;
        the last one is the classifier's output."""
        out, features = self.lifted(x), []
        for layer in self.blocks:
            out = layer(out)
            features.append(out)
        return features

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map before the classifier, ``[B, C, G, H', W']``."""
        return self.blocks[:-1](self.lifted(x))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits ``[B, classes]``; ``pre_logits=True``: the embedding ``[B, C * G]`` (sum over (H, W))."""
        if pre_logits:
            return features.sum(dim=(-2, -1)).flatten(1)
        return self.pool(self.blocks[-1](features))

    def get_classifier(self) -> GroupMaxHead:
        """The head on the ``pre_logits`` embedding: the 1x1 classifier for every group element, max over G."""
        return GroupMaxHead(self.blocks[-1], len(self.group))

    @staticmethod
    def pool(last: Tensor) -> Tensor:
        """Logits from the classifier output ``[B, classes, G, H, W]``: sum over (H, W), then max over G."""
        return last.sum(dim=(-2, -1)).amax(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: Tensor, layer: int = 0) -> Tensor:
        """Attention probabilities of attention layer ``layer`` (0 = lifting, 1.. = group layers in order):
        lifting ``[B, heads, G, H, W, P, P]``, group ``[B, heads, G(v), G(g), H, W, G(m), P, P]`` (dropout off)."""
        layers = self.attention_layers()
        if not -len(layers) <= layer < len(layers):
            raise IndexError(f"layer {layer} out of range: the model has {len(layers)} attention layers (0 = lifting)")
        target = layers[layer]
        if target is self.lift:
            self.check_input(x)
            return target.attention_probabilities(self.input_dropout(x))
        out = self.lifted(x)
        for block in self.blocks:  # up to the block of ``target``
            if getattr(block, "attn", None) is target:
                break
            out = block(out)
        return target.attention_probabilities(block.act(block.norm_in(out)))


class GroupMaxHead(nn.Module):
    """Logits from GE-ViT embeddings ``[..., C * G]`` (channel-major): the classifier ``[classes, C]`` applied to
    every group element, then the max over G. Shares the classifier's weight (not a submodule of the model, so
    state dicts are unchanged)."""

    def __init__(self, classifier: Pointwise, group_size: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.group_size = group_size

    def forward(self, e: Tensor) -> Tensor:
        e = e.unflatten(-1, (-1, self.group_size)).transpose(-1, -2)  # [..., C * G] -> [..., G, C]
        return F.linear(e, self.classifier.weight, self.classifier.bias).amax(-2)  # [..., G, classes] -> max over G


def build_gevit(preset: str = "rotmnist", group: str | Group = "p4", patch_size: int | None = 5,
                num_classes: int | None = None, attention: str = "local", group_index: str = "corrected",
                positional: str = "gevit", **overrides: Any) -> GEViT:
    """A GE-ViT (or GSA-Net, ``positional="gsa"``) with a preset architecture ("rotmnist", "pcam", "cifar10").

    attention: "local" (P x P neighbourhoods, ``patch_size``) or "global" (whole image of the preset's
    ``image_size``); ``overrides`` replace any :class:`GEViTConfig` field (e.g. ``num_channels=4, impl="plain"``).
    """
    key = str(preset).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    grp = get_group(group)
    if grp.name not in GROUP_NAMES:
        warnings.warn(f"group {grp.name} is not one of the original's groups {GROUP_NAMES}", stacklevel=2)
    if attention not in ("local", "global"):
        raise ValueError(f"attention must be 'local' or 'global', got {attention!r}")
    if attention == "local" and patch_size is None:
        raise ValueError("local attention needs a patch_size")
    fields = set(GEViTConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown GE-ViT option(s) {sorted(unknown)}; valid: {sorted(fields)}")
    for name in ("block_sizes", "expansion_per_block", "crop_per_layer"):
        if name in overrides:
            value = overrides[name]
            overrides[name] = (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
    base = PRESETS[key]
    cfg = replace(base, group=grp.name, patch_size=patch_size if attention == "local" else None,
                  num_classes=base.num_classes if num_classes is None else int(num_classes),
                  group_index=group_index, positional=positional, **overrides)
    return GEViT(cfg)


# ---- published checkpoints -------------------------------------------------------------------------------------
_DERIVED = re.compile(r"(^|\.)(row_indices|col_indices|g_indices)$"
                      r"|(^|\.)group\._(identity|elements|relative_positions)$")
_W = r"(?P<w>weight|bias)"
_NORM = r"(?:layer_norm\.)?(?P<w>weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = r"transformer\.(?P<i>\d+)\."
_ATTENTION = (  # attention-layer key suffix: original -> this library's
    (r"(?P<p>query|key|value)\." + _W, r"\g<p>.\g<w>"),
    (r"wout\." + _W, r"out.\g<w>"),
    (r"(?P<p>row|col)_embedding\.0\." + _W, r"pos.\g<p>.inp.\g<w>"),
    (r"(?P<p>row|col)_embedding\.1\.layer_norm\." + _W, r"pos.\g<p>.norm.\g<w>"),
    (r"(?P<p>row|col)_embedding\.3\." + _W, r"pos.\g<p>.out.\g<w>"),
    (r"group_embedding\.weight", "pos.group_embedding.weight"),
)
_BLOCK_PARTS = {"attention.0": "norm_in", "attention.3": "norm_out", "mlp.0": "mlp_in", "mlp.1": "mlp_norm",
                "mlp.3": "mlp_out", "mlp.4": "mlp_norm_out", "shortcut.0": "shortcut"}
_PREFIXES = ((r"lifting_self_attention\.", "lift."), (_BLOCK + r"attention\.2\.", r"blocks.\g<i>.attn."))
_RENAMES = [  # original key pattern (full match, the first that matches wins) -> key of GEViT
    *((prefix + suffix, new + new_suffix) for prefix, new in _PREFIXES for suffix, new_suffix in _ATTENTION),
    *((_BLOCK + re.escape(part) + r"\.(?:layer_norm\.)?(?P<p>\w+)", rf"blocks.\g<i>.{name}.\g<p>")
      for part, name in _BLOCK_PARTS.items()),
    (r"lifting_normalization\." + _NORM, r"lift_norm.\g<w>"),
    (_BLOCK + _NORM, r"blocks.\g<i>.\g<w>"),
]


def _rename(key: str) -> str | None:
    """Original key -> key of :class:`GEViT` (None: unknown to the converter)."""
    for pattern, new in _RENAMES:
        if m := re.fullmatch(pattern, key):
            return m.expand(new)
    return None


def convert_original_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an original GroupTransformer state dict (``module.`` prefix removed) into (weights renamed to this
    library's modules, derived buffers under their original names); unknown keys keep their original names."""
    weights: dict[str, Tensor] = {}
    derived: dict[str, Tensor] = {}
    for key, value in state.items():
        if _DERIVED.search(key):
            derived[key] = value
        elif (new := _rename(key)) is None:
            weights[key] = value
        else:
            weights[new] = value.reshape(value.shape[0], -1) if value.dim() > 2 else value  # conv 1x1 -> [out, in]
    return weights, derived


def _same_table(value: Tensor, table: Tensor) -> bool:
    return value.shape == table.shape and torch.equal(value.long(), table)


def _check_derived(model: GEViT, derived: Mapping[str, Tensor]) -> None:
    """Compare the checkpoint's coordinate grids and group-index tables with the ones this model derives."""
    cfg, group = model.config, model.group
    warned = False
    for key, value in derived.items():
        name = key.rsplit(".", 1)[-1]
        if name in ("row_indices", "col_indices") and cfg.patch_size is not None:
            coords = relative_coordinates(group, cfg.patch_size, cfg.positional)[..., int(name == "col_indices")]
            if value.shape != coords.shape or (value.double() - coords).abs().max() > 1e-5:
                raise IncompatibleCheckpointError(
                    f"{key}: the checkpoint's transformed offset grid differs from the {cfg.positional!r} encoding of "
                    f"group {group.name} with patch size {cfg.patch_size} (wrong positional, group or patch?)")
        if name != "g_indices" or _same_table(value, group_index_table(group, cfg.group_index, cfg.positional)):
            continue
        if cfg.group_index == "corrected" and _same_table(value, group_index_table(group, "reference", cfg.positional)):
            if not warned:
                warnings.warn(
                    f"{key}: the checkpoint was trained with the original (non-equivariant) group-index table "
                    f"of {group.name}; with group_index='corrected' the model is exactly equivariant but "
                    "does not reproduce the published outputs (use group_index='reference' for that)", stacklevel=3)
            warned = True
            continue
        raise IncompatibleCheckpointError(
            f"{key}: the checkpoint's group-index table matches neither the {cfg.group_index!r} nor the "
            f"'reference' table of group {group.name} ({cfg.positional!r} convention)")


def from_original_state_dict(state: Mapping[str, Tensor], preset: str, group: str, patch_size: int | None = 5,
                             num_classes: int | None = None, group_index: str = "corrected",
                             **options: Any) -> GEViT:
    """:func:`build_gevit` with an original GroupTransformer state dict (``module.`` prefix stripped) loaded;
    the derived buffers are checked against the model's own (docs/architecture.md)."""
    model = build_gevit(preset, group, patch_size=patch_size, num_classes=num_classes, group_index=group_index,
                        **options)
    weights, derived = convert_original_state_dict(state)
    elements = derived.get("group._elements")
    if elements is not None and elements.shape[0] != len(model.group):
        raise IncompatibleCheckpointError(f"the checkpoint's group has {elements.shape[0]} elements, "
                                          f"{model.group.name} has {len(model.group)}")
    load_into(model, weights, source=f"original GE-ViT state dict ({preset}, {model.group.name})")
    _check_derived(model, derived)
    return model


# ---- registry: the families and the published checkpoints ---------------------------------------------------------
register_model(build_gevit, name="gevit")
register_model(functools.partial(build_gevit, positional="gsa"), name="gsa_net")  # the GSA-Nets positional encoding
_DIR = "demos/checkpoints/rotMNIST_model_"
_TRAINING = "_activ_Swish_norm_LayerNorm_white_1.41421356_optim_Adam_lr_"
for _weights in (
    PublishedWeights(
        "gevit_p4sa_patch5_rotmnist",
        f"{_DIR}p4sa_type_Local_patch_5_dpatt_0.1_dpval_0.1{_TRAINING}0.0005_bs_64_ep_500_wd_0.0001_seed_0_sched_"
        "constants_schdec_1.0.pt",
        "cc83edcf57c152ac87c1353cf748593bc1c999aedea99b05e3618c6d326df15b",
        "GE-ViT p4 (C4), local patch 5, 10 classes, trained on rotated MNIST (used for Rotation.gif)",
        {"preset": "rotmnist", "group": "p4", "patch_size": 5, "num_classes": 10},
    ),
    PublishedWeights(
        "gevit_p4msa_patch5_rotmnist",
        f"{_DIR}p4msa_type_Local_patch_5_dpatt_0.1_dpval_0.1{_TRAINING}0.001_bs_16_ep_50_wd_0.0001_seed_0_sched_"
        "constants_schdec_1.0.pt",
        "e6e77e753f89df83dcfc676015600aa49ebdb8c21808723feaa7ee177280adb5",
        "GE-ViT p4m (D4), local patch 5, 2 classes (digit 3 -> 0, 8 -> 1), rotated MNIST; trained with the "
        "original (non-equivariant) group-embedding table, so it needs group_index='reference'",
        {"preset": "rotmnist", "group": "p4m", "patch_size": 5, "num_classes": 2, "group_index": "reference"},
    ),
):
    register_model(build_gevit, weights=_weights, convert=from_original_state_dict)
