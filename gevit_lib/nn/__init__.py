"""Equivariant self-attention layers (GE-ViT, GSA-Nets): lifting and group self-attention, positional encodings."""

from .attention import GroupSelfAttention, LiftingSelfAttention, global_attention, local_attention, reference_attention
from .fast_attention import fast_local_attention
from .positional import group_index_table, reference_relative_positions, relative_coordinates

__all__ = ["LiftingSelfAttention", "GroupSelfAttention", "local_attention", "global_attention", "reference_attention",
           "fast_local_attention", "group_index_table", "reference_relative_positions", "relative_coordinates"]
