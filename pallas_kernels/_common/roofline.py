"""Roofline bounds from a kernel's own block plan: FLOPs and HBM bytes per call.

Each op's ``cost.py`` counts, for one call of its kernels with given sizes, block sizes and
backend, the floating-point operations its blocks perform and the bytes its grid moves between
HBM and the core (every block copy the index maps ask for, outputs and residuals written,
statistics re-read per visit), not the ideal minimum. :func:`bound_seconds` turns that into
the time the slower of the two resources allows on a chip, so a change that cuts traffic
shows in the benchmark's roofline column before any hardware run.

Chip figures are the vendors' dense bf16 matrix rate and HBM bandwidth (leads, not
measurements; the H100's matmul rate is the ~790 TFLOP/s measured on a lent H100/H200 here).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: dense bf16 FLOP/s and HBM bytes/s."""
  name: str
  bf16_flops_per_s: float
  hbm_bytes_per_s: float

  @property
  def ridge(self) -> float:
    """FLOPs per byte above which a kernel is compute-bound on this chip."""
    return self.bf16_flops_per_s / self.hbm_bytes_per_s


CHIPS: dict[str, Chip] = {
    "v5e": Chip("v5e", 197e12, 819e9),
    "v6e": Chip("v6e", 918e12, 1640e9),
    "h100": Chip("h100", 790e12, 3.35e12),
}


@dataclasses.dataclass(frozen=True)
class Cost:
  """FLOPs and HBM bytes of one call (forward, or forward + backward), from the block plan.

  ``parts`` names the terms (e.g. {"dkv.stats": bytes, ...}) so a report can say where the
  bytes go; ``flops`` and ``hbm_bytes`` are their totals (parts may cover bytes only).
  """
  flops: float
  hbm_bytes: float
  parts: tuple[tuple[str, float], ...] = ()

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes,
                self.parts + other.parts)

  @property
  def intensity(self) -> float:
    """FLOPs per HBM byte."""
    return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")

  def bound_seconds(self, chip: str | Chip) -> float:
    """The roofline lower bound on one call's time on ``chip``: max(FLOPs / rate, bytes / BW)."""
    chip = CHIPS[chip] if isinstance(chip, str) else chip
    return max(self.flops / chip.bf16_flops_per_s, self.hbm_bytes / chip.hbm_bytes_per_s)

  def bound_by(self, chip: str | Chip) -> str:
    """"compute" or "memory": which term sets :meth:`bound_seconds` on ``chip``."""
    chip = CHIPS[chip] if isinstance(chip, str) else chip
    return "compute" if self.intensity >= chip.ridge else "memory"


def itemsize(dtype) -> int:
  """Bytes per element of a dtype (numpy or jax dtype, or its name)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.dtype(dtype).itemsize
