"""Titans neural long-term memory: public op, naive reference, Pallas (TPU, GPU) and chunked
XLA backends."""

from pallas_kernels.titans_memory.ops import titans_memory
from pallas_kernels.titans_memory.reference import memory_apply, titans_memory_reference
from pallas_kernels.titans_memory.step import titans_memory_step

__all__ = ["memory_apply", "titans_memory", "titans_memory_reference", "titans_memory_step"]
