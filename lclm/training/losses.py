"""Token cross-entropy from hidden states without the full [batch, seq, vocab] logits.

A language model's last step maps hidden states h [batch, seq, features] to float32 logits
h @ W [batch, seq, vocab]. At 8K tokens and a 128K vocabulary those logits alone take 4 GiB
(and as much again for their gradient), more than the rest of a small model's activations.
:func:`chunked_cross_entropy_sums` computes the masked sums the train step needs from h
and W tile by tile: the sequence is cut into chunks of ``chunk_size`` positions (a
``lax.scan``), and each chunk's vocabulary into tiles of ``vocab_chunk_size`` entries (an
online log-sum-exp), so that at most [batch, chunk_size, vocab_chunk_size] float32 logits
exist at a time. It is a ``jax.custom_vjp``: the forward keeps only the per-token
log-sum-exp (float32 [batch, seq]); the backward recomputes each tile's logits, forms
dlogits there and accumulates dW in float32 over the chunks.

Semantics, per token t with logits l = soft_cap(h_t @ W) (``cap * tanh(l / cap)`` when a
soft cap is given) and lse_t = logsumexp(l):

  ce_sum      sum_t mask_t * (lse_t - l[target_t])
  correct     sum_t mask_t * [argmax l == target_t]   (first index on ties, as jnp.argmax)
  num_tokens  sum_t mask_t
  z_loss_sum  sum_t mask_t * lse_t^2                  (PaLM's z-loss, before its weight)

all float32 whatever the input dtype (products accumulate in float32). Gradients flow from
``ce_sum`` and ``z_loss_sum`` to ``hidden`` and ``weights``; ``correct`` and
``num_tokens`` are constants of the inputs. In the backward, dlogits is rounded to the
operands' dtype before its two matrix products (bf16 operands, float32 accumulation, as
the forward's product), so bfloat16 gradients match the full computation's to bf16
rounding, float32 ones to float32 rounding.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

SUM_NAMES = ("ce_sum", "correct", "num_tokens", "z_loss_sum")


def _is_positive_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check(hidden, weights, targets, loss_mask, soft_cap, chunk_size, vocab_chunk_size):
  if hidden.ndim != 3 or not jnp.issubdtype(hidden.dtype, jnp.floating):
    raise ValueError("chunked_cross_entropy_sums: hidden must be a float [batch, seq, "
                     f"features] array, got {hidden.dtype}{tuple(hidden.shape)}.")
  if (weights.ndim != 2 or weights.shape[0] != hidden.shape[2]
      or not jnp.issubdtype(weights.dtype, jnp.floating)):
    raise ValueError("chunked_cross_entropy_sums: weights must be a float [features, vocab] "
                     f"array with features = {hidden.shape[2]} (hidden's last dimension), got "
                     f"{weights.dtype}{tuple(weights.shape)}.")
  if tuple(targets.shape) != hidden.shape[:2] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError("chunked_cross_entropy_sums: targets must be integer [batch, seq] = "
                     f"{hidden.shape[:2]}, got {targets.dtype}{tuple(targets.shape)}.")
  if tuple(loss_mask.shape) != hidden.shape[:2]:
    raise ValueError("chunked_cross_entropy_sums: loss_mask must be [batch, seq] = "
                     f"{hidden.shape[:2]}, got shape {tuple(loss_mask.shape)}.")
  if soft_cap is not None and (isinstance(soft_cap, bool) or not isinstance(
      soft_cap, numbers.Real) or not 0 < soft_cap < math.inf):
    raise ValueError("chunked_cross_entropy_sums: soft_cap must be a positive number or None, "
                     f"got {soft_cap!r}.")
  if not _is_positive_int(chunk_size):
    raise ValueError("chunked_cross_entropy_sums: chunk_size must be a positive int (sequence "
                     f"positions per chunk), got {chunk_size!r}.")
  if vocab_chunk_size is not None and not _is_positive_int(vocab_chunk_size):
    raise ValueError("chunked_cross_entropy_sums: vocab_chunk_size must be a positive int or "
                     f"None (the whole vocabulary at once), got {vocab_chunk_size!r}.")


def chunked_cross_entropy_sums(hidden: jax.Array, weights: jax.Array, targets: jax.Array,
                               loss_mask: jax.Array, *, soft_cap: float | None = None,
                               chunk_size: int = 1024, vocab_chunk_size: int | None = None
                               ) -> dict[str, jax.Array]:
  """Masked cross-entropy sums of ``soft_cap(hidden @ weights)`` without full logits.

  Args:
    hidden: [batch, seq, features] final hidden states (any float dtype).
    weights: [features, vocab] output projection (any float dtype).
    targets: int [batch, seq], the expected token at each position.
    loss_mask: [batch, seq], the weight of each position (0: not counted).
    soft_cap: if set, logits -> soft_cap * tanh(logits / soft_cap) before the softmax.
    chunk_size: sequence positions per chunk; a chunk's logits are [batch, chunk_size,
      vocab_chunk_size] float32. Any seq works (the last chunk is padded and masked).
    vocab_chunk_size: vocabulary entries per tile of the online log-sum-exp; None: the
      whole vocabulary in one tile. Any vocab works (the last tile overlaps the previous
      one and counts only its new entries).

  Returns:
    {"ce_sum", "correct", "num_tokens", "z_loss_sum"}: float32 scalars (see the module
    docstring), differentiable in ``hidden`` and ``weights`` through ce_sum and z_loss_sum.
  """
  _check(hidden, weights, targets, loss_mask, soft_cap, chunk_size, vocab_chunk_size)
  seq, vocab = hidden.shape[1], weights.shape[1]
  chunk_size = min(chunk_size, max(seq, 1))
  vocab_chunk_size = vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab)
  mask = loss_mask.astype(jnp.float32)
  ce_sum, correct, z_sum = _sums(
      None if soft_cap is None else float(soft_cap), chunk_size, vocab_chunk_size,
      hidden, weights, targets.astype(jnp.int32), mask)
  return {"ce_sum": ce_sum, "correct": correct, "num_tokens": jnp.sum(mask),
          "z_loss_sum": z_sum}


# ------------------------------------------------------------------------------ tiling


def _chunked(x, chunk_size):
  """[batch, seq, ...] -> [chunks, batch, chunk_size, ...], zero-padded at the end."""
  batch, seq = x.shape[:2]
  chunks = -(-seq // chunk_size)
  x = jnp.pad(x, [(0, 0), (0, chunks * chunk_size - seq)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(batch, chunks, chunk_size, *x.shape[2:]), 1, 0)


def _unchunked(x, seq):
  """[chunks, batch, chunk_size, ...] -> [batch, seq, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :seq]


def _vocab_tiles(vocab, tile):
  """Number of tiles, and tile i's start: i * tile, the last one moved back to vocab - tile
  (it then overlaps the previous tile; its entries below i * tile are not new)."""
  return -(-vocab // tile), lambda i: jnp.minimum(i * tile, vocab - tile)


def _tile_logits(h, weights, i, tile, soft_cap):
  """Logits of vocab tile i: (capped logits, raw logits, column ids, new-column mask), the
  first two float32 [batch, chunk, tile]."""
  vocab = weights.shape[1]
  start = _vocab_tiles(vocab, tile)[1](i)
  w = jax.lax.dynamic_slice_in_dim(weights, start, tile, axis=1)
  dtype = jnp.result_type(h.dtype, w.dtype)
  raw = jnp.einsum("bcf,fv->bcv", h.astype(dtype), w.astype(dtype),
                   preferred_element_type=jnp.float32)
  logits = raw if soft_cap is None else soft_cap * jnp.tanh(raw / soft_cap)
  columns = start + jnp.arange(tile)
  return logits, raw, columns, columns >= i * tile


def _chunk_forward(h, weights, targets, soft_cap, tile):
  """One chunk: lse, target logit and argmax hits, float32 [batch, chunk]."""
  num_tiles = _vocab_tiles(weights.shape[1], tile)[0]
  shape = targets.shape

  def body(carry, i):
    running_max, running_sum, target_logit, best, best_index = carry
    logits, _, columns, new = _tile_logits(h, weights, i, tile, soft_cap)
    logits = jnp.where(new, logits, -jnp.inf)
    tile_max = jnp.max(logits, axis=-1)
    new_max = jnp.maximum(running_max, tile_max)
    running_sum = (running_sum * jnp.exp(running_max - new_max)
                   + jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1))
    is_target = (columns == targets[..., None]) & new
    target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    tile_best = columns[jnp.argmax(logits, axis=-1)]
    better = tile_max > best  # strict: the earlier tile keeps ties, as jnp.argmax
    best_index = jnp.where(better, tile_best, best_index)
    best = jnp.where(better, tile_max, best)
    return (new_max, running_sum, target_logit, best, best_index), None

  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape),
          jnp.full(shape, -jnp.inf), jnp.zeros(shape, jnp.int32))
  if num_tiles == 1:
    (running_max, running_sum, target_logit, _, best_index), _ = body(init, 0)
  else:
    (running_max, running_sum, target_logit, _, best_index), _ = jax.lax.scan(
        body, init, jnp.arange(num_tiles))
  lse = running_max + jnp.log(running_sum)
  return lse, target_logit, (best_index == targets).astype(jnp.float32)


def _forward(soft_cap, chunk_size, tile, hidden, weights, targets, mask):
  def body(carry, xs):
    h, t, m = xs
    lse, target_logit, hits = _chunk_forward(h, weights, t, soft_cap, tile)
    ce_sum, correct, z_sum = carry
    carry = (ce_sum + jnp.sum(m * (lse - target_logit)), correct + jnp.sum(m * hits),
             z_sum + jnp.sum(m * jnp.square(lse)))
    return carry, lse

  zero = jnp.zeros((), jnp.float32)
  xs = (_chunked(hidden, chunk_size), _chunked(targets, chunk_size), _chunked(mask, chunk_size))
  sums, lse = jax.lax.scan(body, (zero, zero, zero), xs)
  return sums, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sums(soft_cap, chunk_size, tile, hidden, weights, targets, mask):
  return _forward(soft_cap, chunk_size, tile, hidden, weights, targets, mask)[0]


def _sums_fwd(soft_cap, chunk_size, tile, hidden, weights, targets, mask):
  sums, lse = _forward(soft_cap, chunk_size, tile, hidden, weights, targets, mask)
  return sums, (hidden, weights, targets, mask, lse)


def _sums_bwd(soft_cap, chunk_size, tile, residuals, cotangents):
  hidden, weights, targets, mask, lse = residuals
  g_ce, _, g_z = (jnp.asarray(g, jnp.float32) for g in cotangents)
  vocab = weights.shape[1]
  num_tiles, start_of = _vocab_tiles(vocab, tile)
  dtype = jnp.result_type(hidden.dtype, weights.dtype)

  def chunk(d_weights, xs):
    h, t, m, chunk_lse = xs

    def tile_grads(carry, i):
      d_h, d_weights = carry
      logits, raw, columns, new = _tile_logits(h, weights, i, tile, soft_cap)
      probs = jnp.exp(logits - chunk_lse[..., None])
      d_logits = (g_ce * (probs - (columns == t[..., None])) +
                  (2.0 * g_z) * chunk_lse[..., None] * probs)
      d_logits = jnp.where(new, d_logits * m[..., None], 0.0)
      if soft_cap is not None:
        d_logits = d_logits * (1.0 - jnp.square(jnp.tanh(raw / soft_cap)))
      d_logits = d_logits.astype(dtype)
      start = start_of(i)
      w = jax.lax.dynamic_slice_in_dim(weights, start, tile, axis=1).astype(dtype)
      d_h = d_h + jnp.einsum("bcv,fv->bcf", d_logits, w, preferred_element_type=jnp.float32)
      d_w = jnp.einsum("bcf,bcv->fv", h.astype(dtype), d_logits,
                       preferred_element_type=jnp.float32)
      d_weights = jax.lax.dynamic_update_slice_in_dim(
          d_weights, jax.lax.dynamic_slice_in_dim(d_weights, start, tile, axis=1) + d_w,
          start, axis=1)
      return (d_h, d_weights), None

    init = (jnp.zeros(h.shape, jnp.float32), d_weights)
    if num_tiles == 1:
      (d_h, d_weights), _ = tile_grads(init, 0)
    else:
      (d_h, d_weights), _ = jax.lax.scan(tile_grads, init, jnp.arange(num_tiles))
    return d_weights, d_h.astype(hidden.dtype)

  xs = (_chunked(hidden, chunk_size), _chunked(targets, chunk_size), _chunked(mask, chunk_size),
        lse)
  d_weights, d_hidden = jax.lax.scan(chunk, jnp.zeros(weights.shape, jnp.float32), xs)
  return (_unchunked(d_hidden, hidden.shape[1]), d_weights.astype(weights.dtype), None,
          jnp.zeros_like(mask))


_sums.defvjp(_sums_fwd, _sums_bwd)


def reference_cross_entropy_sums(hidden: jax.Array, weights: jax.Array, targets: jax.Array,
                                 loss_mask: jax.Array, *, soft_cap: float | None = None
                                 ) -> dict[str, jax.Array]:
  """The same sums from the full float32 logits [batch, seq, vocab] (to be read, and for
  tests): what :func:`chunked_cross_entropy_sums` computes tile by tile."""
  dtype = jnp.result_type(hidden.dtype, weights.dtype)
  logits = jnp.einsum("btf,fv->btv", hidden.astype(dtype), weights.astype(dtype),
                      preferred_element_type=jnp.float32)
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  return full_logits_sums(logits, targets, loss_mask)


def full_logits_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
                     ) -> dict[str, jax.Array]:
  """The sums of the module docstring from logits [batch, seq, vocab] (cast to float32)."""
  logits = logits.astype(jnp.float32)
  mask = loss_mask.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"ce_sum": jnp.sum(mask * (lse - target_logit)), "correct": jnp.sum(mask * hits),
          "num_tokens": jnp.sum(mask), "z_loss_sum": jnp.sum(mask * jnp.square(lse))}
