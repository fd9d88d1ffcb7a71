"""Flax NNX layers of lclm: attention, feed-forward (dense and mixture of experts),
normalisation, short convolution, position encodings, and the state-space /
linear-recurrent mixers (Mamba, Mamba-2, S4D, lightning attention)."""

from layers.attention import Attention
from layers.landmark_attention import LandmarkAttention
from layers.lightning import LightningAttention
from layers.mamba import Mamba, MambaState
from layers.mamba2 import Mamba2
from layers.mlp import GatedMLP
from layers.moe import MoEMLP, load_balancing_loss
from layers.norms import RMSNorm
from layers.partitioning import (activation_constraints, constrain_activation, kernel_sharding,
                                 logical_axes_of, shard_kernel, with_logical_axes)
from layers.position_extensions import (lm_infinite_attention, merge_attention,
                                        self_extend_attention)
from layers.rope import apply_rope, rope_frequencies
from layers.s4d import S4D
from layers.short_conv import ShortConv

__all__ = [
    "Attention", "GatedMLP", "LandmarkAttention", "LightningAttention", "Mamba", "Mamba2",
    "MambaState", "MoEMLP",
    "RMSNorm", "S4D", "ShortConv", "activation_constraints", "apply_rope",
    "constrain_activation", "kernel_sharding", "lm_infinite_attention", "load_balancing_loss",
    "logical_axes_of", "merge_attention", "rope_frequencies", "self_extend_attention",
    "shard_kernel", "with_logical_axes",
]
