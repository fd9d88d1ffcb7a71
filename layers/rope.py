"""Rotary position embeddings (RoPE).

Two steps, kept apart so that position-extension schemes (PI, NTK, YaRN, ...) only change
the first: :func:`rope_frequencies` gives the inverse frequencies of the rotated pairs, and
:func:`apply_rope` rotates each pair of a head vector by ``position * inv_freq``.

Pair ``i`` (of ``head_dim // 2``) is rotated by the angle ``position * inv_freq[i]``. Which
two coordinates form pair ``i`` is the layout:

* ``"half"``: coordinates ``i`` and ``i + head_dim // 2`` (rotate-half; GPT-NeoX, Llama);
* ``"interleaved"``: coordinates ``2 * i`` and ``2 * i + 1`` (GPT-J).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("half", "interleaved")


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Inverse frequencies ``theta ** (-2 i / head_dim)`` for i in [0, head_dim // 2).

  Computed in float64 on the host and rounded once to float32.

  Returns:
    float32 [head_dim // 2].
  """
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"rope_frequencies: head_dim must be positive and even, got {head_dim}.")
  if theta <= 0:
    raise ValueError(f"rope_frequencies: theta must be positive, got {theta}.")
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  return jnp.asarray(theta ** -exponents, dtype=jnp.float32)


def apply_rope(x: jax.Array, position_ids: jax.Array, inv_freq: jax.Array, *,
               layout: str = "half") -> jax.Array:
  """Rotates the head vectors of ``x`` by their positions.

  Args:
    x: [batch, seq, heads, head_dim], any float dtype.
    position_ids: integer [batch, seq] (or broadcastable to it); any integers, e.g.
      offsets in a cache or positions restarting at each packed segment.
    inv_freq: [head_dim // 2] inverse frequencies, e.g. from :func:`rope_frequencies`.
    layout: "half" or "interleaved" (see the module docstring).

  Returns:
    [batch, seq, heads, head_dim] in x's dtype. Angles and the rotation are computed in
    float32.
  """
  _check_inputs(x, position_ids, inv_freq, layout)
  angles = position_ids.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
  cos = jnp.cos(angles)[:, :, None, :]  # [batch, seq, 1, head_dim // 2]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  if layout == "half":
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  return out.astype(x.dtype)


def _check_inputs(x, position_ids, inv_freq, layout):
  if layout not in LAYOUTS:
    raise ValueError(f"apply_rope: layout must be one of {LAYOUTS}, got {layout!r}.")
  if x.ndim != 4:
    raise ValueError(
        f"apply_rope: x must be [batch, seq, heads, head_dim], got shape {x.shape}."
    )
  head_dim = x.shape[-1]
  if inv_freq.shape != (head_dim // 2,) or head_dim % 2:
    raise ValueError(
        f"apply_rope: inv_freq must have shape ({head_dim // 2},) for an even head_dim, got "
        f"inv_freq {inv_freq.shape} and head_dim {head_dim}."
    )
  if not jnp.issubdtype(position_ids.dtype, jnp.integer):
    raise ValueError(
        f"apply_rope: position_ids must be integers, got dtype {position_ids.dtype}."
    )
  try:
    ok = position_ids.ndim == 2 and (
        jnp.broadcast_shapes(position_ids.shape, x.shape[:2]) == x.shape[:2])
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
        f"apply_rope: position_ids must be [batch, seq] = {x.shape[:2]} (or broadcast to "
        f"it), got shape {position_ids.shape}."
    )
