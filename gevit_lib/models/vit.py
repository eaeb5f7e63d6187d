"""The plain pre-LayerNorm Vision Transformer of the post's post-hoc experiments (UvA DL tutorial 11), timm-style.

Module and parameter names equal the original ``train_vit.VisionTransformer``'s, so the three published state dicts
load as they are. ``forward_features`` gives the tokens after the last block (the final LayerNorm is the head's
first layer, as in the original); ``forward_head(tokens, pre_logits=True)`` is the CLS vector before it, the
embedding every post-hoc method pools.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..hub import PublishedWeights, load_into
from ._registry import check_batch, register_model

# name -> constructor arguments (503,178 parameters for "mnist", 521,794 for "pcam", as the original's)
PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(embed_dim=64, hidden_dim=512, num_heads=4, num_layers=6, patch_size=4, num_channels=1,
                  num_patches=49, num_classes=10, dropout=0.1),
    "pcam": dict(embed_dim=64, hidden_dim=512, num_heads=4, num_layers=6, patch_size=6, num_channels=3,
                 num_patches=256, num_classes=2, dropout=0.1),
}


def img_to_patch(x: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]``: patches in row-major order, each flattened as (C, p, p)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(2, 4)


class AttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` (GELU, dropout after both linears)."""

    def __init__(self, embed_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.layer_norm_2 = nn.LayerNorm(embed_dim)
        self.linear = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, embed_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:  # [B, L, D]
        h = self.layer_norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.linear(self.layer_norm_2(x))


class VisionTransformer(nn.Module):
    """Patchify -> Linear -> prepend a CLS token -> add positions -> dropout -> blocks -> head on the CLS token.
    Attention is ``nn.MultiheadAttention`` with ``batch_first=True`` (the original's parameters; fused kernels)."""

    def __init__(self, embed_dim: int = 64, hidden_dim: int = 512, num_heads: int = 4, num_layers: int = 6,
                 patch_size: int = 4, num_channels: int = 1, num_patches: int = 49, num_classes: int = 10,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.patch_size, self.num_channels = patch_size, num_channels
        self.num_patches, self.num_classes = num_patches, num_classes
        self.embed_dim = self.num_features = embed_dim
        self.input_layer = nn.Linear(num_channels * patch_size**2, embed_dim)
        self.transformer = nn.Sequential(*(AttentionBlock(embed_dim, hidden_dim, num_heads, dropout)
                                           for _ in range(num_layers)))
        self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        self.dropout = nn.Dropout(dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + num_patches, embed_dim))

    def _check_input(self, x: Tensor) -> None:
        p = self.patch_size
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.num_channels:
            raise ValueError(f"expected {self.num_channels} input channel(s), got {c} (input shape {tuple(x.shape)})")
        check_batch(x, self)
        if h % p or w % p or (h // p) * (w // p) != self.num_patches:
            side = round(self.num_patches**0.5) * p
            raise ValueError(f"image size {h}x{w} does not fit this ViT: patch size {p} and {self.num_patches} "
                             f"patches need (H/{p})*(W/{p}) = {self.num_patches}, e.g. {side}x{side}")

    def _tokens(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self.input_layer(img_to_patch(x, self.patch_size))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens ``[B, 1 + num_patches, embed_dim]`` (CLS first) after the last block."""
        return self.transformer(self._tokens(x))

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Tokens after every block (the last one is :meth:`forward_features`)."""
        out, features = self._tokens(x), []
        for block in self.transformer:
            out = block(out)
            features.append(out)
        return features

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from tokens; ``pre_logits=True``: the CLS vector before the head's LayerNorm."""
        cls = x[:, 0]
        return cls if pre_logits else self.mlp_head(cls)

    def get_classifier(self) -> nn.Module:
        """The head (LayerNorm + Linear) that maps :meth:`embed` to logits."""
        return self.mlp_head

    def embed(self, x: Tensor) -> Tensor:
        """CLS vector before the head's LayerNorm, ``[B, embed_dim]`` (what post-hoc methods aggregate)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_vit(preset: str = "mnist", **overrides: Any) -> VisionTransformer:
    """A ViT from a preset ("mnist": 1x28x28, 10 classes; "pcam": 3x96x96, 2 classes), any argument overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - set(PRESETS[preset])
    if unknown:
        raise TypeError(f"unknown VisionTransformer arguments {sorted(unknown)}; valid: {sorted(PRESETS[preset])}")
    return VisionTransformer(**{**PRESETS[preset], **overrides})


def from_original_state_dict(state: Mapping[str, Tensor], preset: str = "mnist", **options: Any) -> VisionTransformer:
    """Build a ViT (``options`` override the preset) and load an original state dict (the names are the
    original's; a ``module.`` prefix is removed); a mismatch raises ``IncompatibleCheckpointError``."""
    model = build_vit(preset, **options)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return load_into(model, state, source=f"ViT state dict (preset {preset!r})")


# the family and the published checkpoints
register_model(build_vit, name="vit")
_POSTHOC = "src/post_hoc_equivariance/checkpoints/"
for _name, _folder, _sha256, _what in (
    ("vit_rotmnist", "rotmnist", "36c83de78c91472574ca140b24eb9c50b01a6940599b12b262fdd71f1ed09945",
     "plain ViT trained on rotated MNIST (post-hoc experiment 1)"),
    ("vit_mnist", "train_mnist", "b9f2f9e0ebfde47d7a187f6c27ca511dfd97f95f6089873ae18825c41e71e5db",
     "plain ViT trained on upright MNIST (post-hoc experiment 2)"),
    ("vit_rotmnist_10pct", "less_data_rotmnist", "4b0e26ca75d7f758859f2937c38928e64d7f88ad23ba1cd47da1af4ae767ab37",
     "plain ViT trained on 10% of rotated MNIST (post-hoc experiment 3)"),
):
    _weights = PublishedWeights(_name, f"{_POSTHOC}{_folder}/normal_vit.pt", _sha256, _what, {"preset": "mnist"})
    register_model(build_vit, weights=_weights, convert=from_original_state_dict)
