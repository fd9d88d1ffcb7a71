"""Long-sequence cores as Pallas kernels, each with a blockwise XLA path and a naive reference.

Every public op follows the kernel contract of the design guide (GUIDE §3): an
``implementation`` argument (None | "pallas" | "interpret" | "xla" | "reference"), a custom
VJP with float32 accumulation, clear ValueErrors for bad inputs, no NaN on empty rows.
"""

from pallas_kernels._common import masks
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.lightning_attention import (lightning_attention,
                                               lightning_attention_reference)
from pallas_kernels.ring_attention import (context_parallel_attention, ring_attention,
                                          ring_attention_reference)
from pallas_kernels.selective_scan import selective_scan, selective_scan_reference
from pallas_kernels.ssd import ssd, ssd_reference
from pallas_kernels.titans_memory import titans_memory, titans_memory_reference

__all__ = ["context_parallel_attention", "decode_attention", "decode_attention_reference",
           "flash_attention", "flash_attention_reference",
           "lightning_attention", "lightning_attention_reference", "masks", "ring_attention",
           "ring_attention_reference", "selective_scan", "selective_scan_reference", "ssd",
           "ssd_reference", "titans_memory", "titans_memory_reference"]
