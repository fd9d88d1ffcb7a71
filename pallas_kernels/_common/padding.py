"""Padding helpers: kernels tile fixed block sizes; ops pad inputs and slice outputs."""

from __future__ import annotations

import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pad_axis(x, axis: int, size: int, value=0):
  """Pads ``x`` with ``value`` along ``axis`` up to ``size`` (no-op when already that size)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  if extra < 0:
    raise ValueError(f"pad_axis: axis {axis} has size {x.shape[axis]} > target {size}.")
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)
