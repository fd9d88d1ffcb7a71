"""Lightning attention (linear attention with a per-head decay): public op, naive reference,
Pallas (TPU, GPU) and chunked XLA backends."""

from pallas_kernels.lightning_attention.ops import lightning_attention
from pallas_kernels.lightning_attention.reference import lightning_attention_reference

__all__ = ["lightning_attention", "lightning_attention_reference"]
