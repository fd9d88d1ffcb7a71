"""Lightning-attention Pallas kernels for TPU (Mosaic): forward, dQ and dK/dV.

Same module interface as ``xla.py`` (whose docstring gives the chunk algebra): inputs
[batch, heads, seq, dim] padded by ``ops.py`` to whole chunks and to head dims that are
multiples of 128 lanes.

Grids. Every kernel runs a grid (batch, heads, chunks) whose chunk axis is "arbitrary": a
sequential sweep with the running [d_k, d_v] float32 state (or its gradient) in VMEM
scratch. The forward and the dQ kernel sweep forwards (dQ recomputes the states instead of
storing one per chunk); the dK/dV kernel sweeps backwards (its index maps read chunk
n - 1 - c) carrying dS, which it starts from the final-state cotangent and hands out as the
initial-state gradient. Per chunk: the [C, C] intra-chunk products and the state updates
(K^T V, Q^T dO) run on the MXU in the input dtype with float32 accumulation
(``preferred_element_type``); the products that read the float32 state or its gradient
(Q S, dO S^T, K dS, V dS^T) take it in float32 at full precision, so the state is never
rounded to the input dtype (as in ssd). Decay factors are exp(n log λ) with n >= 0, log λ
read from SMEM; the row factors of those products (Λq, Λk) scale their float32 results.

Segments ride as relative run ids (see ``xla.py``) in the two layouts Mosaic tiles
natively: lane-replicated [seq, 128] for the query rows, sublane-replicated [8, seq] for
the key columns (as in the flash-attention kernels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
MIN_CHUNK = 128
DEFAULT_CHUNK_SIZES = dict(chunk_size=256, chunk_size_bwd=256)
_EXP_FLOOR = -80.0
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def padded_dims(d_k: int, d_v: int) -> tuple[int, int]:
  return -(-d_k // LANES) * LANES, -(-d_v // LANES) * LANES


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  """MXU matmul with float32 accumulation; float32 operands at full float32 precision."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _lanes(x, width):
  """Broadcast a lane-replicated [rows, 128] array to [rows, width] (width % 128 == 0)."""
  return x if width == LANES else jnp.tile(x, (1, width // LANES))


def _power(steps, log_decay):
  """λ^steps for int32 steps (0 where steps < 0); as ``xla.decay_power``: the exponent is
  clamped to [-80, 0] and tiny results are exact zeros."""
  x = jnp.maximum(steps, 0).astype(jnp.float32) * log_decay
  return jnp.where((steps >= 0) & (x > _EXP_FLOOR), jnp.exp(jnp.maximum(x, _EXP_FLOOR)), 0.0)


def _decays(log_decay, chunk_index, seg_refs, *, chunk, seq_len):
  """Decay factors of one chunk: mask [C, C], q_decay [C, 1], k_decay [C, 1], gamma [1, 1].

  Masked entries are 0; no exponent is positive, even where the result is discarded.
  """
  f32 = jnp.float32
  valid = jnp.clip(seq_len - chunk_index * chunk, 0, chunk)
  row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  diff = row - col
  mask = _power(diff, log_decay)
  pos = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  q_decay = _power(pos + 1, log_decay)
  k_decay = _power(valid - 1 - pos, log_decay)
  gamma = _power(jnp.full((1, 1), valid, jnp.int32), log_decay)
  if seg_refs is not None:
    rows_ref, cols_ref = seg_refs
    rows = rows_ref[...]
    run = rows[:, :1]  # [C, 1]
    # [1, 1]: the chunk's last run (padding repeats the last real token's); reduced in
    # float32, exact for these small counts.
    last = jnp.max(run.astype(f32), axis=0, keepdims=True).astype(jnp.int32)
    mask = jnp.where(_lanes(rows, chunk) == cols_ref[:1, :], mask, 0.0)
    q_decay = jnp.where(run == 0, q_decay, 0.0)
    k_decay = jnp.where(run == last, k_decay, 0.0)
    gamma = jnp.where(last == 0, gamma, 0.0)
  return mask, q_decay, k_decay, gamma


def _scaled(x, factor):
  """x * factor in float32, back in x's dtype (an MXU operand)."""
  return (x.astype(jnp.float32) * factor).astype(x.dtype)


def _f32(x):
  return x.astype(jnp.float32)


def _split(refs, num_inputs, has_segments):
  inputs, rest = refs[:num_inputs], refs[num_inputs:]
  if has_segments:
    return inputs, (rest[0], rest[1]), rest[2:]
  return inputs, None, rest


def _forward_kernel(log_decay_ref, *refs, chunk, seq_len, has_segments):
  (q_ref, k_ref, v_ref, s0_ref), seg_refs, rest = _split(refs, 4, has_segments)
  o_ref, final_ref, state_scr = rest
  h, c = pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _init():
    state_scr[...] = s0_ref[...]

  mask, q_decay, k_decay, gamma = _decays(log_decay_ref[h], c, seg_refs, chunk=chunk,
                                          seq_len=seq_len)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  state = state_scr[...]
  scores = _dot(q, k, _NT) * mask
  out = _dot(scores.astype(v.dtype), v)
  out = out + q_decay * _dot(_f32(q), state)  # the state in float32
  o_ref[...] = out.astype(o_ref.dtype)
  state_scr[...] = gamma * state + _dot(_scaled(k, k_decay), v, _TN)

  @pl.when(c == pl.num_programs(2) - 1)
  def _finish():
    final_ref[...] = state_scr[...]


def _dq_kernel(log_decay_ref, *refs, chunk, seq_len, has_segments):
  (k_ref, v_ref, do_ref, s0_ref), seg_refs, rest = _split(refs, 4, has_segments)
  dq_ref, state_scr = rest
  h, c = pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _init():
    state_scr[...] = s0_ref[...]

  mask, q_decay, k_decay, gamma = _decays(log_decay_ref[h], c, seg_refs, chunk=chunk,
                                          seq_len=seq_len)
  k, v, do = k_ref[...], v_ref[...], do_ref[...]
  state = state_scr[...]
  d_scores = _dot(do, v, _NT) * mask
  dq = _dot(d_scores.astype(k.dtype), k)
  dq = dq + q_decay * _dot(_f32(do), state, _NT)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  state_scr[...] = gamma * state + _dot(_scaled(k, k_decay), v, _TN)


def _dkv_kernel(log_decay_ref, *refs, chunk, seq_len, has_segments):
  (q_ref, k_ref, v_ref, do_ref, ds_final_ref), seg_refs, rest = _split(refs, 5, has_segments)
  dk_ref, dv_ref, ds0_ref, dstate_scr = rest
  h, step = pl.program_id(1), pl.program_id(2)
  c = pl.num_programs(2) - 1 - step

  @pl.when(step == 0)
  def _init():
    dstate_scr[...] = ds_final_ref[...]

  mask, q_decay, k_decay, gamma = _decays(log_decay_ref[h], c, seg_refs, chunk=chunk,
                                          seq_len=seq_len)
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  dstate = dstate_scr[...]  # float32, read at full precision below
  scores = _dot(q, k, _NT) * mask
  d_scores = _dot(do, v, _NT) * mask
  dv = _dot(scores.astype(do.dtype), do, _TN) + k_decay * _dot(_f32(k), dstate)
  dk = _dot(d_scores.astype(q.dtype), q, _TN) + k_decay * _dot(_f32(v), dstate, _NT)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dstate_scr[...] = gamma * dstate + _dot(_scaled(q, q_decay), do, _TN)

  @pl.when(step == pl.num_programs(2) - 1)
  def _finish():
    ds0_ref[...] = dstate_scr[...]


def _segment_inputs(rel):
  if rel is None:
    return ()
  rows = jnp.broadcast_to(rel[:, :, None], rel.shape + (LANES,))
  cols = jnp.broadcast_to(rel[:, None, :], (rel.shape[0], SUBLANES, rel.shape[1]))
  return rows, cols


def _specs(chunk, widths, *, reverse, num_chunks, has_segments):
  """BlockSpecs of [B, H, T, width] inputs chunked along T, then the segment arrays."""
  def chunk_of(c):
    return num_chunks - 1 - c if reverse else c

  specs = [pl.BlockSpec((None, None, chunk, w), lambda b, h, c: (b, h, chunk_of(c), 0))
           for w in widths]
  seg_specs = []
  if has_segments:
    seg_specs = [pl.BlockSpec((None, chunk, LANES), lambda b, h, c: (b, chunk_of(c), 0)),
                 pl.BlockSpec((None, SUBLANES, chunk), lambda b, h, c: (b, 0, chunk_of(c)))]
  return specs, seg_specs


def _state_spec(dk, dv):
  return pl.BlockSpec((None, None, dk, dv), lambda b, h, c: (b, h, 0, 0))


_SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)
_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def lightning_forward(q, k, v, initial_state, log_decay, rel, *, seq_len, chunk_size,
                      interpret=False):
  """Returns o [B, H, T, Dv] (q.dtype) and the final state [B, H, Dk, Dv] (float32)."""
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  n = t // chunk_size
  has_segments = rel is not None
  specs, seg_specs = _specs(chunk_size, (dk, dk, dv), reverse=False, num_chunks=n,
                            has_segments=has_segments)
  kernel = functools.partial(_forward_kernel, chunk=chunk_size, seq_len=seq_len,
                             has_segments=has_segments)
  return pl.pallas_call(
      kernel, grid=(b, h, n),
      in_specs=[_SMEM, *specs, _state_spec(dk, dv), *seg_specs],
      out_specs=[specs[2], _state_spec(dk, dv)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=_PARAMS, interpret=interpret, name="lclm_lightning_fwd",
  )(log_decay.astype(jnp.float32), q, k, v, initial_state.astype(jnp.float32),
    *_segment_inputs(rel))


def lightning_backward(q, k, v, initial_state, log_decay, rel, d_out, d_final_state, *,
                       seq_len, chunk_size, interpret=False):
  """Returns dq, dk, dv (input dtypes) and the initial-state gradient (float32)."""
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  n = t // chunk_size
  has_segments = rel is not None
  seg_inputs = _segment_inputs(rel)
  log_decay = log_decay.astype(jnp.float32)
  static = dict(chunk=chunk_size, seq_len=seq_len, has_segments=has_segments)

  # dQ: forward sweep over k, v, dO, recomputing the states.
  specs, seg_specs = _specs(chunk_size, (dk, dv, dv), reverse=False, num_chunks=n,
                            has_segments=has_segments)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **static), grid=(b, h, n),
      in_specs=[_SMEM, *specs, _state_spec(dk, dv), *seg_specs],
      out_specs=specs[0],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=_PARAMS, interpret=interpret, name="lclm_lightning_dq",
  )(log_decay, k, v, d_out, initial_state.astype(jnp.float32), *seg_inputs)

  # dK, dV: reverse sweep over q, k, v, dO carrying dS.
  specs, seg_specs = _specs(chunk_size, (dk, dk, dv, dv), reverse=True, num_chunks=n,
                            has_segments=has_segments)
  dk_, dv_, d_initial = pl.pallas_call(
      functools.partial(_dkv_kernel, **static), grid=(b, h, n),
      in_specs=[_SMEM, *specs, _state_spec(dk, dv), *seg_specs],
      out_specs=[specs[1], specs[2], _state_spec(dk, dv)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=_PARAMS, interpret=interpret, name="lclm_lightning_dkv",
  )(log_decay, q, k, v, d_out, d_final_state.astype(jnp.float32), *seg_inputs)
  return dq, dk_, dv_, d_initial
