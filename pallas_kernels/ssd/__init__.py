"""SSD (Mamba-2's state-space duality): public op, naive reference, Pallas (TPU, GPU) and
chunked XLA backends."""

from pallas_kernels.ssd.ops import ssd
from pallas_kernels.ssd.reference import ssd_reference

__all__ = ["ssd", "ssd_reference"]
