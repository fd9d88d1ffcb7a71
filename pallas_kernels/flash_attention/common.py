"""Math shared by the flash-attention backends (``xla.py``, ``tpu.py``, ``gpu.py``).

Layout-agnostic helpers on the softmax statistics; the Pallas kernels and the blockwise XLA
path import them from here, never from each other.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def attention_delta(out, d_out, d_lse, accum=jnp.float32, head_axis_last: bool = False):
  """rowsum(dO * O) - dLSE: the per-row term of dS = P * (dP - delta).

  Args:
    out, d_out: the forward output and its cotangent, [B, H, T, D] (or [B, T, H, D]).
    d_lse: the cotangent of the log-sum-exp, [B, H, T], or None (zero).
    accum: float32 (float64 for float64 inputs).
    head_axis_last: with [B, T, H, D] inputs, return [B, H, T] all the same.

  Returns:
    [B, H, T] in ``accum``.
  """
  delta = jnp.sum(d_out.astype(accum) * out.astype(accum), axis=-1)
  if head_axis_last:
    delta = jnp.swapaxes(delta, 1, 2)
  if d_lse is not None:
    delta = delta - d_lse.astype(accum)
  return delta


def clip_query_blocks(intervals, num_real_blocks: int):
  """Block-sparsity intervals [..., 4] whose query-block range stops at ``num_real_blocks``.

  For key-major visit lists (rows are key blocks, columns query blocks): query blocks made
  only of padding (index >= ``num_real_blocks``) are visited by nobody. numpy in, numpy out;
  (lo, hi, full_lo, full_hi) keep lo <= full_lo <= full_hi <= hi.
  """
  return np.minimum(intervals, num_real_blocks).astype(intervals.dtype)
