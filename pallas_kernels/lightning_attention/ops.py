"""Public lightning-attention op: validation, dispatch on ``implementation``, custom VJP.

The backends (``xla.py``, ``tpu.py``, ``gpu.py``) share one module interface and work on
[batch, heads, seq, dim] arrays padded to whole chunks (and, for the Pallas kernels, to the
head dims they tile); this module transposes, pads, turns segment ids into run ids, calls
them under a ``jax.custom_vjp`` and slices the padding off again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import dispatch, padding, validation
from pallas_kernels.lightning_attention.reference import lightning_attention_reference

OP = "lightning_attention"
LAYOUT_QK = "[batch, seq, heads, d_k]"
LAYOUT_V = "[batch, seq, heads, d_v]"
LAYOUT_STATE = "[batch, heads, d_k, d_v]"


def _backend_module(name: str) -> ModuleType:
  return dispatch.backend_module(__package__, name)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call; hashable, so it rides as a nondiff argument."""
  backend: str
  seq_len: int
  chunk_size: int
  chunk_size_bwd: int
  block_head_dim: int | None
  interpret: bool

  def kernel_kwargs(self, backward: bool) -> dict:
    kwargs = dict(seq_len=self.seq_len, interpret=self.interpret,
                  chunk_size=self.chunk_size_bwd if backward else self.chunk_size)
    if self.block_head_dim is not None:
      kwargs["block_head_dim"] = self.block_head_dim
    return kwargs


def relative_runs(runs, chunk: int):
  """Run ids [B, T] (T a multiple of ``chunk``) -> run ids relative to each chunk's start.

  ``runs`` counts the segment starts before and at each token (0 for the row's first
  segment; edge padded). The result is, per token, the number of segment starts between
  the chunk's first token (included) and the token: 0 means "still in the segment that was
  running before this chunk", so it sees the carried state.
  """
  if runs is None:
    return None
  b, t = runs.shape
  blocks = runs.reshape(b, t // chunk, chunk)
  before = jnp.concatenate([jnp.zeros((b, 1), runs.dtype), blocks[:, :-1, -1]], axis=1)
  return (blocks - before[..., None]).reshape(b, t)


def run_ids(segment_ids, padded_len: int):
  """Segment ids [B, T] -> int32 run ids [B, padded_len]: the number of tokens up to and
  including each one whose segment id differs from the previous token's (edge padded, so
  padding continues the last segment)."""
  seg = segment_ids.astype(jnp.int32)
  starts = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
  runs = jnp.concatenate([jnp.zeros_like(seg[:, :1]), jnp.cumsum(starts, axis=1)], axis=1)
  return jnp.pad(runs, ((0, 0), (0, padded_len - runs.shape[1])), mode="edge")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lightning(q, k, v, initial_state, log_decay, runs, config: _Config):
  module = _backend_module(config.backend)
  return module.lightning_forward(
      q, k, v, initial_state, log_decay, relative_runs(runs, config.chunk_size),
      **config.kernel_kwargs(backward=False))


def _lightning_fwd(q, k, v, initial_state, log_decay, runs, config):
  out, final_state = _lightning(q, k, v, initial_state, log_decay, runs, config)
  return (out, final_state), (q, k, v, initial_state, log_decay, runs)


def decay_gradient(q, k, v, initial_state, log_decay, runs, d_out, d_final_state, *,
                   seq_len, chunk_size):
  """d loss / d log λ per head [H]: one forward-mode pass of the chunked XLA forward.

  The tangent of (o, final state) along log λ (all heads at once: a head's outputs depend
  on its own λ only), contracted with the cotangents. Every term is formed with its own
  exact decay power, so nothing cancels: the gradient stays accurate for tiny λ and long
  sequences. It costs about two forward passes in XLA and, under ``jax.jit``, is removed
  as dead code when nobody asks for the gradient of ``decay`` (e.g. a constant decay).
  Inputs in the kernel layout [B, H, T_pad, D]; ``chunk_size`` must divide T_pad.
  """
  from pallas_kernels.lightning_attention import xla

  def forward(log_decay):
    return xla.lightning_forward(q, k, v, initial_state, log_decay,
                                 relative_runs(runs, chunk_size), seq_len=seq_len,
                                 chunk_size=chunk_size, out_dtype=xla.accum_dtype(q.dtype))

  _, (out_dot, final_dot) = jax.jvp(forward, (log_decay,), (jnp.ones_like(log_decay),))
  accum = out_dot.dtype
  return (jnp.sum(d_out.astype(accum) * out_dot, axis=(0, 2, 3)) +
          jnp.sum(d_final_state.astype(accum) * final_dot, axis=(0, 2, 3)))


def _lightning_bwd(config, residuals, cotangents):
  q, k, v, initial_state, log_decay, runs = residuals
  d_out, d_final_state = cotangents
  module = _backend_module(config.backend)
  dq, dk, dv, d_initial = module.lightning_backward(
      q, k, v, initial_state, log_decay, relative_runs(runs, config.chunk_size_bwd), d_out,
      d_final_state, **config.kernel_kwargs(backward=True))
  d_log_decay = decay_gradient(q, k, v, initial_state, log_decay, runs, d_out, d_final_state,
                               seq_len=config.seq_len, chunk_size=config.chunk_size_bwd)
  return (dq, dk, dv, d_initial.astype(initial_state.dtype),
          d_log_decay.astype(log_decay.dtype), None)


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def _log_decay(decay):
  """log λ, with λ below the smallest normal float taken as that float (a traced decay of 0,
  which cannot be validated, or a subnormal one that the CPU flushes to 0): powers of it are
  0 to working precision, and neither the values nor the gradient become NaN (the gradient
  of such a λ is 0)."""
  tiny = jnp.finfo(decay.dtype).tiny
  normal = decay >= tiny
  return jnp.where(normal, jnp.log(jnp.where(normal, decay, 1.0)), float(np.log(tiny)))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _validate(q, k, v, decay, initial_state, segment_ids, op=OP):
  validation.check_rank(op, "q", q, 4, LAYOUT_QK)
  validation.check_rank(op, "k", k, 4, LAYOUT_QK)
  validation.check_rank(op, "v", v, 4, LAYOUT_V)
  for name, x in (("q", q), ("k", k), ("v", v)):
    validation.check_float_dtype(op, name, x)
  validation.check_same_dtype(op, ("q", "k", "v"), (q, k, v))
  b, t, h, dk = q.shape
  validation.check_shape(op, "k", k, q.shape, f"{LAYOUT_QK} (the shape of q)")
  if tuple(v.shape[:3]) != (b, t, h):
    raise ValueError(f"{op}: v must be {LAYOUT_V} with batch={b}, seq={t}, heads={h} like q "
                     f"{tuple(q.shape)}, got {tuple(v.shape)}.")
  dv = v.shape[3]
  if not hasattr(decay, "shape"):
    try:
      decay = np.asarray(decay, np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"{op}: decay must be an array [heads] of floats in (0, 1], got "
                       f"{type(decay).__name__}.") from None
  if tuple(decay.shape) != (h,):
    raise ValueError(f"{op}: decay must have shape ({h},) [heads], one λ per head, got "
                     f"{tuple(decay.shape)}.")
  if not jnp.issubdtype(decay.dtype, jnp.floating):
    raise ValueError(f"{op}: decay must be a floating array, got dtype {decay.dtype}.")
  if _is_concrete(decay) and h:
    values = np.asarray(decay, np.float64)
    bad = ~(np.isfinite(values) & (values > 0) & (values <= 1))
    if bad.any():
      raise ValueError(
          f"{op}: decay must lie in (0, 1] for every head (λ = 1 is plain causal linear "
          f"attention), got {values[bad][:4].tolist()} at heads "
          f"{np.flatnonzero(bad)[:4].tolist()}.")
  if initial_state is not None:
    validation.check_rank(op, "initial_state", initial_state, 4, LAYOUT_STATE)
    validation.check_float_dtype(op, "initial_state", initial_state)
    validation.check_shape(op, "initial_state", initial_state, (b, h, dk, dv), LAYOUT_STATE)
  if segment_ids is not None:
    validation.check_rank(op, "segment_ids", segment_ids, 2, "[batch, seq]")
    validation.check_int_dtype(op, "segment_ids", segment_ids)
    validation.check_shape(op, "segment_ids", segment_ids, (b, t), "[batch, seq]")
  return jnp.asarray(decay)


def _chunk_sizes(module, seq_len, requested: dict, op=OP):
  """Requested (or default) chunk sizes, shrunk for short inputs, validated."""
  sizes = {}
  minimum = module.MIN_CHUNK
  power_of_two = getattr(module, "POWER_OF_TWO_CHUNKS", False)
  for name, value in requested.items():
    size = module.DEFAULT_CHUNK_SIZES[name] if value is None else value
    validation.check_positive_int(op, name, size)
    if size % minimum:
      raise ValueError(f"{op}: {name} must be a multiple of {minimum} for this "
                       f"implementation, got {size}.")
    length = padding.round_up(max(seq_len, 1), minimum)
    if power_of_two:
      if size & (size - 1):
        raise ValueError(f"{op}: {name} must be a power of two >= {minimum} for this "
                         f"implementation (Triton tiles), got {size}.")
      length = padding.next_power_of_2(length)
    sizes[name] = int(min(size, length))
  return sizes


def _block_head_dim(module, block_head_dim, op=OP):
  if not hasattr(module, "DEFAULT_BLOCK_HEAD_DIM"):
    validation.check_positive_int(op, "block_head_dim", block_head_dim, allow_none=True)
    return None
  size = module.DEFAULT_BLOCK_HEAD_DIM if block_head_dim is None else block_head_dim
  validation.check_positive_int(op, "block_head_dim", size)
  if size < 16 or size & (size - 1):
    raise ValueError(f"{op}: block_head_dim must be a power of two >= 16 for the GPU "
                     f"kernels, got {size}.")
  return int(size)


def lightning_attention(q, k, v, *, decay, chunk_size=None, initial_state=None,
                        return_final_state=False, implementation=None, segment_ids=None,
                        chunk_size_bwd=None, block_head_dim=None):
  """Causal linear attention with a per-head exponential decay (lightning attention).

      S_t = λ S_{t-1} + k_t^T v_t,      o_t = q_t S_t,

  the recurrence of TransNormerLLM's and MiniMax-01's lightning attention (no softmax, no
  scaling of q: the layer normalises the output). Computed block-wise (lightning
  attention-2): inside a chunk as masked matrix products (in the input dtype, accumulated
  in float32), across chunks through the [d_k, d_v] state, which is kept and read in float32
  whatever the input dtype (the products with the state or its gradient take it in float32
  at full precision). The result does not depend on ``chunk_size`` (lengths are padded
  internally; padded tokens neither decay nor feed the state).

  Args:
    q, k: [batch, seq, heads, d_k].
    v: [batch, seq, heads, d_v].
    decay: [heads] λ per head, in (0, 1]; 1 is plain causal linear attention. Powers of λ
      are formed as exp(n log λ), so a tiny λ gives zeros, never NaN. A concrete decay is
      validated; a traced one cannot be (keep it in (0, 1]). Differentiable (a per-head
      constant in the layers, but available): the gradient is one forward-mode pass of the
      chunked XLA forward (:func:`decay_gradient`), compiled away when unused.
    chunk_size: tokens per chunk of the forward pass (None: per-platform default: XLA 128,
      TPU 256, GPU 64). XLA: any positive size; TPU kernels: multiples of 128; GPU
      kernels: powers of two >= 16.
    initial_state: [batch, heads, d_k, d_v] state before the first token (None: zeros);
      with ``segment_ids`` it reaches the row's first segment only. Differentiable.
    return_final_state: also return the state after the row's last token.
    implementation: None (compiled Pallas on TPU/GPU, "xla" elsewhere and for float64),
      "pallas", "interpret", "xla" or "reference". The Pallas kernels compute in float32:
      float64 inputs take "xla" or "reference" (a ValueError says so).
    segment_ids: int [batch, seq] or None. The state restarts from zero at every token
      whose segment id differs from the previous token's (packed sequences).
    chunk_size_bwd: chunk of the backward kernels (None: the forward's default).
    block_head_dim: GPU kernels only: the d_v (forward, dK/dV) and d_k (dQ) tile of one
      program, a power of two >= 16 (None: 64). Ignored elsewhere.

  Returns:
    o [batch, seq, heads, d_v] in q's dtype; with ``return_final_state`` also the final
    state [batch, heads, d_k, d_v] in float32 (float64 for float64 inputs).
  """
  decay = _validate(q, k, v, decay, initial_state, segment_ids)
  b, t, h, dk = q.shape
  dv = v.shape[3]
  accum = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
  platform = dispatch.platform_of(q, k, v)
  impl = dispatch.resolve_implementation(OP, implementation, platform)
  if accum == jnp.float64:  # The Pallas kernels compute in float32 (as ssd, selective_scan).
    if implementation is None:
      impl = "xla"
    elif impl in ("pallas", "interpret"):
      raise ValueError(f"{OP}: float64 inputs run with implementation='xla' or 'reference' "
                       f"(or None, which picks 'xla' for them), got implementation={impl!r}.")
  for name, value in (("chunk_size", chunk_size), ("chunk_size_bwd", chunk_size_bwd)):
    validation.check_positive_int(OP, name, value, allow_none=True)

  if impl == "reference":
    return lightning_attention_reference(
        q, k, v, decay=decay, initial_state=initial_state,
        return_final_state=return_final_state, segment_ids=segment_ids)

  state0 = (jnp.zeros((b, h, dk, dv), accum) if initial_state is None
            else initial_state.astype(accum))
  if 0 in (b, t, h, dk, dv):
    out = jnp.zeros(v.shape, q.dtype)
    return (out, state0) if return_final_state else out

  backend = "xla" if impl == "xla" else dispatch.pallas_backend(platform)
  module = _backend_module(backend)
  chunks = _chunk_sizes(module, t, dict(chunk_size=chunk_size, chunk_size_bwd=chunk_size_bwd))
  head_block = _block_head_dim(module, block_head_dim)
  t_pad = padding.round_up(t, math.lcm(chunks["chunk_size"], chunks["chunk_size_bwd"]))
  dk_pad, dv_pad = module.padded_dims(dk, dv)

  def to_kernel_layout(x, width):
    x = jnp.transpose(x, (0, 2, 1, 3))
    return padding.pad_axis(padding.pad_axis(x, 2, t_pad), 3, width)

  qp, kp = to_kernel_layout(q, dk_pad), to_kernel_layout(k, dk_pad)
  vp = to_kernel_layout(v, dv_pad)
  kernel_accum = accum if backend == "xla" else jnp.float32
  s0 = padding.pad_axis(padding.pad_axis(state0.astype(kernel_accum), 2, dk_pad), 3, dv_pad)
  log_decay = _log_decay(decay.astype(kernel_accum))
  runs = None if segment_ids is None else run_ids(segment_ids, t_pad)
  config = _Config(backend=backend, seq_len=t, interpret=(impl == "interpret"),
                   block_head_dim=head_block, **chunks)
  out, final_state = _lightning(qp, kp, vp, s0, log_decay, runs, config)
  out = jnp.transpose(out[:, :, :t, :dv], (0, 2, 1, 3))
  if not return_final_state:
    return out
  return out, final_state[:, :, :dk, :dv].astype(accum)
