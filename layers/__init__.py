"""Flax NNX layers of lclm: attention, feed-forward, normalisation and position encodings."""

from layers.attention import Attention
from layers.mlp import GatedMLP
from layers.norms import RMSNorm
from layers.rope import apply_rope, rope_frequencies

__all__ = ["Attention", "GatedMLP", "RMSNorm", "apply_rope", "rope_frequencies"]
