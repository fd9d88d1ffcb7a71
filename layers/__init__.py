"""Flax NNX layers of lclm: attention, feed-forward, normalisation, short convolution and
position encodings."""

from layers.attention import Attention
from layers.mlp import GatedMLP
from layers.norms import RMSNorm
from layers.partitioning import (activation_constraints, constrain_activation, kernel_sharding,
                                 logical_axes_of, shard_kernel, with_logical_axes)
from layers.position_extensions import (lm_infinite_attention, merge_attention,
                                        self_extend_attention)
from layers.rope import apply_rope, rope_frequencies
from layers.short_conv import ShortConv

__all__ = [
    "Attention", "GatedMLP", "RMSNorm", "ShortConv", "activation_constraints", "apply_rope",
    "constrain_activation", "kernel_sharding", "lm_infinite_attention", "logical_axes_of",
    "merge_attention", "rope_frequencies", "self_extend_attention",
    "shard_kernel", "with_logical_axes",
]
