"""Shared pieces of the decode path of the recurrent layers (their ``cache=`` calls)."""

from __future__ import annotations

import jax.numpy as jnp


def check_decode_arguments(layer: str, x, *, cache, state, return_state, segment_ids,
                           num_new_tokens):
  """Checks the decoding arguments of a call; returns num_new_tokens clipped to [0, seq] as
  int32 [batch], or None (every token valid, or no cache: not decoding)."""
  if cache is None:
    if num_new_tokens is not None:
      raise ValueError(f"{layer}: num_new_tokens needs a cache (it is for decoding).")
    return None
  if state is not None:
    raise ValueError(f"{layer}: pass either state= (a carried state) or cache= (decoding), "
                     f"not both.")
  if return_state:
    raise ValueError(f"{layer}: return_state=True cannot be used with a cache (the call "
                     f"already returns (y, new_cache)).")
  if segment_ids is not None:
    raise ValueError(f"{layer}: segment_ids cannot be used with a cache (packed rows are not "
                     f"decoded); pass segment_ids=None.")
  b, seq = x.shape[:2]
  if seq < 1:
    raise ValueError(f"{layer}: decoding with a cache needs at least one new token, got x of "
                     f"shape {x.shape}.")
  if num_new_tokens is None:
    return None
  if (not hasattr(num_new_tokens, "shape") or tuple(num_new_tokens.shape) != (b,)
      or not jnp.issubdtype(num_new_tokens.dtype, jnp.integer)):
    raise ValueError(f"{layer}: num_new_tokens must be None or int [batch] = ({b},), got "
                     f"{getattr(num_new_tokens, 'shape', num_new_tokens)!r} of dtype "
                     f"{getattr(num_new_tokens, 'dtype', type(num_new_tokens).__name__)}.")
  return jnp.clip(num_new_tokens.astype(jnp.int32), 0, seq)


def last_valid(ext, n_new, width: int):
  """ext [batch, width + seq, ...] -> ext[b, n_b : n_b + width] per row: the ``width``
  entries before row b's first padded token."""
  idx = n_new[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [b, width]
  idx = idx.reshape(idx.shape + (1,) * (ext.ndim - 2))
  return jnp.take_along_axis(ext, idx, axis=1)



def check_cache_shape(layer: str, cache, expected: tuple[int, ...], layout: str) -> None:
  """Raises ValueError unless ``cache`` is one array of shape ``expected`` (``layout``
  names its axes, e.g. "[batch, heads, head_dim, head_dim]")."""
  got = tuple(getattr(cache, "shape", ()))
  if got != expected:
    raise ValueError(f"{layer}: cache must have shape {expected} {layout} for a batch of "
                     f"{expected[0]} rows, got {got} (a cache built for another batch size or "
                     "another layer?).")
