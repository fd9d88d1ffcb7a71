"""Lightning attention (linear attention with a per-head decay): public op and naive reference;
the kernels (TPU, GPU, chunked XLA) are SSD's chunked scalar-decay core (``ssd/core.py``)."""

from pallas_kernels.lightning_attention.ops import lightning_attention
from pallas_kernels.lightning_attention.reference import lightning_attention_reference

__all__ = ["lightning_attention", "lightning_attention_reference"]
