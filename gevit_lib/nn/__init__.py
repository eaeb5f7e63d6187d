"""Equivariant self-attention layers (GE-ViT, GSA-Nets): lifting and group self-attention, positional encodings."""

from .attention import (
    IMPLS,
    GroupSelfAttention,
    LiftingSelfAttention,
    Pointwise,
    global_attention,
    local_attention,
    reference_attention,
    reference_logits,
)
from .fast_attention import fast_local_attention
from .positional import (
    GROUP_INDEX,
    POSITIONAL,
    CoordinateMLP,
    RelativePositionalEncoding,
    feature_action_side,
    group_index_table,
    reference_relative_positions,
    relative_coordinates,
)

__all__ = [
    "IMPLS",
    "POSITIONAL",
    "GROUP_INDEX",
    "LiftingSelfAttention",
    "GroupSelfAttention",
    "Pointwise",
    "local_attention",
    "reference_attention",
    "reference_logits",
    "global_attention",
    "fast_local_attention",
    "CoordinateMLP",
    "RelativePositionalEncoding",
    "feature_action_side",
    "group_index_table",
    "reference_relative_positions",
    "relative_coordinates",
]
