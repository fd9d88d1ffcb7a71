"""Selective scan (Mamba-1's S6): public op, naive reference, Pallas (TPU, GPU) and chunked
XLA backends."""

from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.selective_scan.reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]
