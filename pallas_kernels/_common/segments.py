"""Segment ids (packed sequences): the per-token and per-block facts kernels derive from them.

``segment_ids``: int [batch, len]; tokens with equal ids in a row belong to one sequence.
Attention kernels skip block pairs whose id ranges cannot overlap (:func:`block_ranges`);
recurrent kernels restart their state where the id changes (:func:`run_starts`,
:func:`relative_run_ids`).
"""

from __future__ import annotations

import jax.numpy as jnp


def block_ranges(segment_ids, block: int):
  """Per-block (min, max) of segment ids: [batch, len] -> two int [batch, len // block].

  A (query block, key block) pair can hold a visible entry only when the two ranges overlap;
  this is how kernels skip block pairs that segments mask entirely, without an L x L array.
  ``len`` must be a multiple of ``block`` (kernels pad first).
  """
  b, n = segment_ids.shape
  blocks = segment_ids.reshape(b, n // block, block)
  return blocks.min(axis=-1), blocks.max(axis=-1)


def pair_block_ranges(q_segment_ids, kv_segment_ids, block_q: int, block_k: int):
  """(q_min, q_max, kv_min, kv_max): :func:`block_ranges` of the query ids [batch, q_len]
  per ``block_q`` and of the key ids [batch, kv_len] per ``block_k``; None without ids."""
  if q_segment_ids is None:
    return None
  return (*block_ranges(q_segment_ids, block_q), *block_ranges(kv_segment_ids, block_k))


def run_starts(segment_ids):
  """bool [batch, len]: True where a token's id differs from the previous token's; None for
  None. The row's first token is never a start (the initial state applies to its run)."""
  if segment_ids is None:
    return None
  changed = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def relative_run_ids(segment_ids, chunk_size: int):
  """int32 [batch, len]: index of each token's run of equal ids, counted from its chunk's start.

  ``len`` is a multiple of ``chunk_size`` (padding repeats the last id). A run begins at each
  :func:`run_starts` token; 0 marks the run continuing from the previous chunk (or the row's
  first run in the first chunk).
  """
  b, t = segment_ids.shape
  run = jnp.cumsum(run_starts(segment_ids).astype(jnp.int32), axis=1)
  run = run.reshape(b, t // chunk_size, chunk_size)
  before = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), run[:, :-1, -1]], axis=1)
  return (run - before[..., None]).reshape(b, t)
