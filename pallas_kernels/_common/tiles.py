"""TPU tile geometry: a vreg holds [8 sublanes, 128 lanes] of 32-bit values.

Kernels keep per-row statistics (softmax max / sum, reset flags, segment ids) as
"lane-replicated" [rows, 128] arrays: each row holds one value in all 128 lanes, which
broadcasts against a [rows, width] tile without a relayout.
"""

from __future__ import annotations

import jax.numpy as jnp

LANES = 128
SUBLANES = 8
# Scalar prefetch (block-sparsity metadata, visit lists) must fit SMEM, ~1 MiB per TPU core;
# half of it leaves room for Mosaic's own scalars.
SCALAR_PREFETCH_LIMIT_BYTES = 512 * 1024


def lanes(x, width: int):
  """A lane-replicated [rows, 128] array as [rows, width].

  ``width`` < 128 takes the first ``width`` lanes; a multiple of 128 tiles the 128 lanes;
  other widths are not tile shapes (ValueError). Same dtype as ``x``; traceable in Mosaic.
  """
  if width == LANES:
    return x
  if width < LANES:
    return x[:, :width]
  if width % LANES:
    raise ValueError(f"lanes: width must be below {LANES} or a multiple of {LANES}, "
                     f"got {width}.")
  return jnp.tile(x, (1, width // LANES))
