"""Public lightning-attention op: validation, then SSD's chunked scalar-decay core.

Lightning attention (S_t = λ S_{t-1} + k_t^T v_t, o_t = q_t S_t) is the scalar-decay
recurrence of ``pallas_kernels.ssd.core`` with x = v, B = k, C = q, one group per head, step
sizes dt = 1 and per-head log decay A = log λ (the state there is H = S^T): the TPU, GPU and
XLA kernels are SSD's. This module validates the arguments, turns λ into log λ and the
initial state into the core's layout, and hands over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import dispatch, numerics, validation
from pallas_kernels.lightning_attention.reference import lightning_attention_reference
from pallas_kernels.ssd import core

OP = "lightning_attention"
LAYOUT_QK = "[batch, seq, heads, d_k]"
LAYOUT_V = "[batch, seq, heads, d_v]"
LAYOUT_STATE = "[batch, heads, d_k, d_v]"


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


def lightning_attention(q, k, v, *, decay, chunk_size=None, initial_state=None,
                        return_final_state=False, implementation=None, segment_ids=None,
                        chunk_size_bwd=None, block_head_dim=None, precision=None):
  """Causal linear attention with a per-head exponential decay (lightning attention).

      S_t = λ S_{t-1} + k_t^T v_t,      o_t = q_t S_t,

  the recurrence of TransNormerLLM's and MiniMax-01's lightning attention (no softmax, no
  scaling of q: the layer normalises the output). Computed block-wise (lightning
  attention-2) by SSD's chunked scalar-decay kernels (``pallas_kernels.ssd.core``): inside a
  chunk as masked matrix products, across chunks through the [d_k, d_v] state, which is kept
  in float32 whatever the input dtype. The result does not depend on ``chunk_size`` (lengths
  are padded internally; padded tokens neither decay nor feed the state).

  Args:
    q, k: [batch, seq, heads, d_k].
    v: [batch, seq, heads, d_v].
    decay: [heads] λ per head, in (0, 1]; 1 is plain causal linear attention. Powers of λ
      are formed as exp(n log λ), so a tiny λ gives zeros, never NaN. A concrete decay is
      validated; a traced one cannot be (keep it in (0, 1]). Differentiable (a per-head
      constant in the layers, but available): the kernels' gradient of the per-token log
      decays, summed over the tokens (each exponent's cotangent over its own stretch of
      tokens: nothing cancels).
    chunk_size: tokens per chunk (None: per-platform default: XLA 64, TPU 128, GPU 64).
      XLA: any positive size; TPU kernels: multiples of 128; GPU kernels: powers of two
      >= 16.
    initial_state: [batch, heads, d_k, d_v] state before the first token (None: zeros);
      with ``segment_ids`` it reaches the row's first segment only. Differentiable.
    return_final_state: also return the state after the row's last token.
    implementation: None (compiled Pallas on TPU/GPU, "xla" elsewhere and for float64),
      "pallas", "interpret", "xla" or "reference". The Pallas kernels compute in float32:
      float64 inputs take "xla" or "reference" (a ValueError says so).
    segment_ids: int [batch, seq] or None. The state restarts from zero at every token
      whose segment id differs from the previous token's (packed sequences).
    chunk_size_bwd: accepted for compatibility and validated (a positive int); the backward
      kernels run the forward's chunks (they recompute its states).
    block_head_dim: GPU kernels only: the d_v tile of one program, a power of two >= 16
      (None: 64). Ignored elsewhere.
    precision: TPU products: None ("bf16x2" for bfloat16 inputs, else "highest"),
      "highest" or "bf16x2" (see ``ssd``).

  Returns:
    o [batch, seq, heads, d_v] in q's dtype; with ``return_final_state`` also the final
    state [batch, heads, d_k, d_v] in float32 (float64 for float64 inputs).
  """
  decay = _validate(q, k, v, decay, initial_state, segment_ids)
  b, t, h, dk = q.shape
  dv = v.shape[3]
  accum = numerics.compute_dtype(q)
  platform = dispatch.platform_of(q, k, v)
  impl = dispatch.resolve_implementation(OP, implementation, platform,
                                         float64=accum == jnp.float64)
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

  swap = lambda s: jnp.swapaxes(s, 2, 3)  # S [.., d_k, d_v] <-> H [.., d_v, d_k]
  out, final = core.scalar_decay(
      v, jnp.ones((b, t, h), accum), _log_decay(decay.astype(accum)), k, q,
      initial_states=swap(state0), segment_ids=segment_ids, implementation=impl,
      platform=platform, chunk_size=chunk_size, block_head_dim=block_head_dim,
      precision=precision, op=OP)
  out = out.astype(q.dtype)
  return (out, swap(final).astype(accum)) if return_final_state else out
