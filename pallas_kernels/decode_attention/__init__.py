"""Decode attention (flash-decoding): public op, naive reference, Pallas (TPU, GPU) and
blockwise XLA backends."""

from pallas_kernels.decode_attention.ops import decode_attention
from pallas_kernels.decode_attention.reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
