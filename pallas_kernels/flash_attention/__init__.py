"""Flash attention: public op, naive reference, Pallas (TPU, GPU) and blockwise XLA backends."""

from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
