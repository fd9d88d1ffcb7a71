"""Lightning-attention Pallas GPU (Triton) kernels: forward, dQ and dK/dV.

Same module interface as ``xla.py`` (whose docstring gives the chunk algebra): inputs
[batch, heads, seq, dim] padded by ``ops.py`` to whole chunks and to power-of-two head dims
>= 16 (Triton tiles are powers of two and its dots need every dimension >= 16).

Kernels. Each program owns one (batch row, head) and one tile of a head dim, and loops over
the chunks of the sequence with the state tile in registers (float32):

  forward  grid (d_v tiles, B, H): state S[:, tile] (d_k x block); per chunk the output
           columns of the tile. The intra-chunk Q K^T is recomputed per tile.
  dQ       grid (d_k tiles, B, H): forward sweep recomputing S[tile, :]; per chunk
           dQ[:, tile] = (dO V^T ⊙ M) K[:, tile] + Λq ⊙ dO S[tile, :]^T.
  dK/dV    grid (d_v tiles, B, H): reverse sweep carrying dS[:, tile]; per chunk dV[:, tile]
           and a partial dK (the d_v tile's share of dO V^T and V dS^T), summed over tiles
           afterwards in float32.

Matmuls take the input dtype (float32 at IEEE precision, not TF32) and accumulate in
float32, except that the products reading the float32 state or its gradient (Q S, dO S^T,
K dS, V dS^T) take it in float32 (IEEE), so the state is never rounded to the input dtype
(as in ssd). Decay factors are exp(n log λ) with n >= 0; log λ comes in as one value per
head; the row factors Λq, Λk scale the float32 results of those products.
Segments ride as relative run ids [B, T] (see ``xla.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import padding

MIN_CHUNK = 16
POWER_OF_TWO_CHUNKS = True
DEFAULT_CHUNK_SIZES = dict(chunk_size=64, chunk_size_bwd=64)
DEFAULT_BLOCK_HEAD_DIM = 64
_EXP_FLOOR = -80.0
_DECAY_LANES = 16  # log λ rides as [H, 16] (Triton blocks are powers of two)


def padded_dims(d_k: int, d_v: int) -> tuple[int, int]:
  pad = lambda d: max(16, padding.next_power_of_2(d))
  return pad(d_k), pad(d_v)


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
  """2-D matmul in the input dtype with float32 accumulation (IEEE float32 for float32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _scaled(x, factor):
  """x * factor[:, None] in float32, back in x's dtype (a matmul operand)."""
  return (x.astype(jnp.float32) * factor[:, None]).astype(x.dtype)


def _f32(x):
  return x.astype(jnp.float32)


def _power(steps, log_decay):
  """λ^steps for int32 steps (0 where steps < 0); as ``xla.decay_power``: the exponent is
  clamped to [-80, 0] and tiny results are exact zeros."""
  x = jnp.maximum(steps, 0).astype(jnp.float32) * log_decay
  return jnp.where((steps >= 0) & (x > _EXP_FLOOR), jnp.exp(jnp.maximum(x, _EXP_FLOOR)), 0.0)


def _decays(log_decay, chunk_index, rel, *, chunk, seq_len):
  """mask [C, C], q_decay [C], k_decay [C] and gamma (scalar) of one chunk; see xla.py."""
  pos = jnp.arange(chunk, dtype=jnp.int32)
  mask = _power(pos[:, None] - pos[None, :], log_decay)
  q_decay = _power(pos + 1, log_decay)
  valid = jnp.clip(seq_len - chunk_index * chunk, 0, chunk)
  k_decay = _power(valid - 1 - pos, log_decay)
  gamma = _power(valid, log_decay)
  if rel is not None:
    last = jnp.max(rel)  # padding repeats the last real token's run
    mask = jnp.where(rel[:, None] == rel[None, :], mask, 0.0)
    q_decay = jnp.where(rel == 0, q_decay, 0.0)
    k_decay = jnp.where(rel == last, k_decay, 0.0)
    gamma = jnp.where(last == 0, gamma, 0.0)
  return mask, q_decay, k_decay, gamma


def _split(refs, has_segments):
  return (refs[0], refs[1:]) if has_segments else (None, refs)


def _forward_kernel(log_decay_ref, q_ref, k_ref, v_ref, s0_ref, *refs, chunk, seq_len,
                    num_chunks, has_segments):
  runs_ref, (o_ref, final_ref) = _split(refs, has_segments)
  log_decay = log_decay_ref[0]

  def body(c, state):
    rows = pl.ds(c * chunk, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    mask, q_decay, k_decay, gamma = _decays(
        log_decay, c, runs_ref[rows] if has_segments else None, chunk=chunk, seq_len=seq_len)
    scores = _dot(q, k, 1, 1) * mask
    out = _dot(scores.astype(v.dtype), v) + q_decay[:, None] * _dot(_f32(q), state)
    o_ref[rows, :] = out.astype(o_ref.dtype)
    return gamma * state + _dot(_scaled(k, k_decay), v, 0, 0)

  final_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...])


def _dq_kernel(log_decay_ref, k_ref, v_ref, do_ref, s0_ref, *refs, chunk, seq_len, num_chunks,
               has_segments):
  runs_ref, (dq_ref,) = _split(refs, has_segments)
  log_decay = log_decay_ref[0]

  def body(c, state):  # state: S[k tile, :]
    rows = pl.ds(c * chunk, chunk)
    k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    mask, q_decay, k_decay, gamma = _decays(
        log_decay, c, runs_ref[rows] if has_segments else None, chunk=chunk, seq_len=seq_len)
    d_scores = _dot(do, v, 1, 1) * mask
    dq = _dot(d_scores.astype(k.dtype), k)
    dq = dq + q_decay[:, None] * _dot(_f32(do), state, 1, 1)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    return gamma * state + _dot(_scaled(k, k_decay), v, 0, 0)

  lax.fori_loop(0, num_chunks, body, s0_ref[...])


def _dkv_kernel(log_decay_ref, q_ref, k_ref, v_ref, do_ref, ds_final_ref, *refs, chunk,
                seq_len, num_chunks, has_segments):
  runs_ref, (dk_ref, dv_ref, ds0_ref) = _split(refs, has_segments)
  log_decay = log_decay_ref[0]

  def body(r, d_state):  # d_state: dS[:, v tile]
    c = num_chunks - 1 - r
    rows = pl.ds(c * chunk, chunk)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    mask, q_decay, k_decay, gamma = _decays(
        log_decay, c, runs_ref[rows] if has_segments else None, chunk=chunk, seq_len=seq_len)
    scores = _dot(q, k, 1, 1) * mask
    d_scores = _dot(do, v, 1, 1) * mask
    dv = (_dot(scores.astype(do.dtype), do, 0, 0)
          + k_decay[:, None] * _dot(_f32(k), d_state))  # dS in float32
    dk = _dot(d_scores.astype(q.dtype), q, 0, 0) + k_decay[:, None] * _dot(_f32(v), d_state, 1, 1)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    dk_ref[rows, :] = dk
    return gamma * d_state + _dot(_scaled(q, q_decay), do, 0, 0)

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, ds_final_ref[...])


def _compiler_params(chunk, width):
  num_warps = 4 if chunk * width <= 64 * 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _tile(width, block_head_dim):
  block = min(block_head_dim, width)
  return block, width // block


def _common_inputs(log_decay, rel, b, t):
  """log λ as [H, 16] and the run ids, with their BlockSpecs for a (tile, b, h) grid."""
  decay = jnp.broadcast_to(log_decay.astype(jnp.float32)[:, None],
                           (log_decay.shape[0], _DECAY_LANES))
  decay_spec = pl.BlockSpec((None, _DECAY_LANES), lambda x, b, h: (h, 0))
  if rel is None:
    return decay, decay_spec, (), ()
  return decay, decay_spec, (rel,), (pl.BlockSpec((None, t), lambda x, b, h: (b, 0)),)


def _full(t, width):
  return pl.BlockSpec((None, None, t, width), lambda x, b, h: (b, h, 0, 0))


def _tiled(rows, width):
  return pl.BlockSpec((None, None, rows, width), lambda x, b, h: (b, h, 0, x))


def _check(chunk, t, interpret):
  if t % chunk:
    raise ValueError(f"lightning_attention (gpu): sequence length {t} is not a multiple of "
                     f"the chunk size {chunk}; pad to whole chunks first.")
  if not interpret and (chunk < MIN_CHUNK or chunk & (chunk - 1)):
    raise ValueError(f"lightning_attention (gpu): Triton needs a power-of-two chunk >= 16, "
                     f"got {chunk}.")


@functools.partial(jax.jit, static_argnames=("seq_len", "chunk_size", "block_head_dim",
                                             "interpret"))
def lightning_forward(q, k, v, initial_state, log_decay, rel, *, seq_len, chunk_size,
                      block_head_dim=DEFAULT_BLOCK_HEAD_DIM, interpret=False):
  """Returns o [B, H, T, Dv] (q.dtype) and the final state [B, H, Dk, Dv] (float32)."""
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  _check(chunk_size, t, interpret)
  block_v, num_tiles = _tile(dv, block_head_dim)
  decay, decay_spec, seg_args, seg_specs = _common_inputs(log_decay, rel, b, t)
  kernel = functools.partial(_forward_kernel, chunk=chunk_size, seq_len=seq_len,
                             num_chunks=t // chunk_size, has_segments=rel is not None)
  return pl.pallas_call(
      kernel, grid=(num_tiles, b, h),
      in_specs=[decay_spec, _full(t, dk), _full(t, dk), _tiled(t, block_v),
                _tiled(dk, block_v), *seg_specs],
      out_specs=[_tiled(t, block_v), _tiled(dk, block_v)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      compiler_params=_compiler_params(chunk_size, max(dk, block_v)), interpret=interpret,
      name="lightning_attention_forward",
  )(decay, q, k, v, initial_state.astype(jnp.float32), *seg_args)


@functools.partial(jax.jit, static_argnames=("seq_len", "chunk_size", "block_head_dim",
                                             "interpret"))
def lightning_backward(q, k, v, initial_state, log_decay, rel, d_out, d_final_state, *,
                       seq_len, chunk_size, block_head_dim=DEFAULT_BLOCK_HEAD_DIM,
                       interpret=False):
  """Returns dq, dk, dv (input dtypes) and the initial-state gradient (float32)."""
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  _check(chunk_size, t, interpret)
  decay, decay_spec, seg_args, seg_specs = _common_inputs(log_decay, rel, b, t)
  static = dict(chunk=chunk_size, seq_len=seq_len, num_chunks=t // chunk_size,
                has_segments=rel is not None)

  # dQ: one program per (d_k tile, b, h); the state rows of the tile S[tile, :].
  block_k, k_tiles = _tile(dk, block_head_dim)
  s0_rows = pl.BlockSpec((None, None, block_k, dv), lambda x, b, h: (b, h, x, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **static), grid=(k_tiles, b, h),
      in_specs=[decay_spec, _tiled(t, block_k), _full(t, dv), _full(t, dv), s0_rows,
                *seg_specs],
      out_specs=_tiled(t, block_k),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(chunk_size, max(dv, block_k)), interpret=interpret,
      name="lightning_attention_dq",
  )(decay, k, v, d_out, initial_state.astype(jnp.float32), *seg_args)

  # dK, dV: one program per (d_v tile, b, h), carrying dS[:, tile]; dK partial per tile.
  block_v, v_tiles = _tile(dv, block_head_dim)
  dk_spec = pl.BlockSpec((None, None, None, t, dk), lambda x, b, h: (x, b, h, 0, 0))
  dk_parts, dv_, d_initial = pl.pallas_call(
      functools.partial(_dkv_kernel, **static), grid=(v_tiles, b, h),
      in_specs=[decay_spec, _full(t, dk), _full(t, dk), _tiled(t, block_v), _tiled(t, block_v),
                _tiled(dk, block_v), *seg_specs],
      out_specs=[dk_spec, _tiled(t, block_v), _tiled(dk, block_v)],
      out_shape=[jax.ShapeDtypeStruct((v_tiles, b, h, t, dk), jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      compiler_params=_compiler_params(chunk_size, max(dk, block_v)), interpret=interpret,
      name="lightning_attention_dkdv",
  )(decay, q, k, v, d_out, d_final_state.astype(jnp.float32), *seg_args)
  return dq, jnp.sum(dk_parts, axis=0).astype(k.dtype), dv_, d_initial
