"""Public SSD op (Mamba-2's state-space duality): validation and dispatch.

The chunked recurrence itself (padding, backends, custom VJP) is ``core.scalar_decay``, which
lightning attention shares: this module validates the arguments, forms the effective step
sizes dt' = softplus(dt + dt_bias) and hands over. The XLA path (``xla.py``) is differentiated
by autodiff of a checkpointed scan over chunks whose exponents carry their own derivative
(``xla.chunk_exponents``); the Pallas backends return the gradient of the per-token log
decays a = dt' A directly.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._common import dispatch, numerics, validation
from pallas_kernels.ssd import core
from pallas_kernels.ssd.reference import effective_dt, ssd_reference

OP = "ssd"
LAYOUT_X = "[batch, seq, heads, head_dim]"
LAYOUT_DT = "[batch, seq, heads]"
LAYOUT_BC = "[batch, seq, n_groups, d_state]"
LAYOUT_STATE = "[batch, heads, head_dim, d_state]"


def _validate(x, dt, A, B, C, D, z, dt_bias, initial_states, segment_ids):
  op = OP
  validation.check_rank(op, "x", x, 4, LAYOUT_X)
  validation.check_rank(op, "dt", dt, 3, LAYOUT_DT)
  validation.check_rank(op, "A", A, 1, "[heads]")
  validation.check_rank(op, "B", B, 4, LAYOUT_BC)
  validation.check_rank(op, "C", C, 4, LAYOUT_BC)
  for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
    validation.check_float_dtype(op, name, a)
  validation.check_same_dtype(op, ("x", "B", "C"), (x, B, C))
  b, t, h, p = x.shape
  validation.check_shape(op, "dt", dt, (b, t, h), f"{LAYOUT_DT} (from x {tuple(x.shape)})")
  validation.check_shape(op, "A", A, (h,), f"[heads] (heads={h} from x)")
  if B.shape[:2] != (b, t):
    raise ValueError(f"{op}: B must be {LAYOUT_BC} with batch={b} and seq={t} like x "
                     f"{tuple(x.shape)}, got {tuple(B.shape)}.")
  g = B.shape[2]
  if g == 0 or h % g:
    raise ValueError(f"{op}: heads ({h}, from x {tuple(x.shape)}) must be a multiple of "
                     f"n_groups ({g}, from B {tuple(B.shape)}).")
  validation.check_shape(op, "C", C, B.shape, f"{LAYOUT_BC} (the shape of B)")
  if D is not None:
    if not hasattr(D, "shape") or tuple(D.shape) not in ((h,), (h, p)):
      raise ValueError(f"{op}: D must have shape ({h},) [heads] or ({h}, {p}) [heads, "
                       f"head_dim], got {getattr(D, 'shape', type(D).__name__)}.")
    validation.check_float_dtype(op, "D", D)
  if z is not None:
    validation.check_rank(op, "z", z, 4, LAYOUT_X)
    validation.check_float_dtype(op, "z", z)
    validation.check_shape(op, "z", z, x.shape, f"{LAYOUT_X} (the shape of x)")
  if dt_bias is not None:
    validation.check_rank(op, "dt_bias", dt_bias, 1, "[heads]")
    validation.check_float_dtype(op, "dt_bias", dt_bias)
    validation.check_shape(op, "dt_bias", dt_bias, (h,), f"[heads] (heads={h} from x)")
  if initial_states is not None:
    validation.check_rank(op, "initial_states", initial_states, 4, LAYOUT_STATE)
    validation.check_float_dtype(op, "initial_states", initial_states)
    validation.check_shape(op, "initial_states", initial_states, (b, h, p, B.shape[3]),
                           LAYOUT_STATE)
  if segment_ids is not None:
    validation.check_rank(op, "segment_ids", segment_ids, 2, "[batch, seq]")
    validation.check_int_dtype(op, "segment_ids", segment_ids)
    validation.check_shape(op, "segment_ids", segment_ids, (b, t), "[batch, seq]")


def ssd(x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
        initial_states=None, return_final_states=False, implementation=None, segment_ids=None,
        block_head_dim=None, precision=None):
  """Mamba-2's selective state-space model by state-space duality (chunked).

  With dt' = dt + dt_bias (then softplus if ``dt_softplus``), per batch row and head:

      H_t = exp(dt'_t A) H_{t-1} + dt'_t x_t ⊗ B_t,    y_t = H_t C_t + D x_t,

  and y_t * silu(z_t) when z is given. Head h reads the B/C group h // (heads / n_groups).
  Computed chunk by chunk (intra-chunk matrix products, inter-chunk state passing, decays in
  log space): the result does not depend on ``chunk_size`` beyond rounding.

  Args:
    x: [batch, seq, heads, head_dim].
    dt: [batch, seq, heads] step sizes (any float dtype; used in float32).
    A: [heads] log-decay rates; A <= 0 expected (A = -exp(A_log)). A step with
      dt' * A > 0 grows the state, as the recurrence says; decays are never exponentiated
      from positive exponents otherwise, so large dt and very negative A stay finite.
    B, C: [batch, seq, n_groups, d_state], heads a multiple of n_groups; x's dtype.
    chunk_size: tokens per chunk. None: per-backend default ("xla" 64, TPU 128, GPU 64).
      "xla" takes any positive size; the TPU kernels need a multiple of 128, the GPU kernels
      a power of two >= 16 (a ValueError says so). Sequences are padded to whole chunks
      with tokens that neither decay nor feed the state.
    D: [heads] or [heads, head_dim] skip weights, or None.
    z: [batch, seq, heads, head_dim] gate, or None.
    dt_bias: [heads], or None.
    dt_softplus: apply softplus to dt + dt_bias.
    initial_states: [batch, heads, head_dim, d_state] state before the first token (it
      reaches the row's first segment only), or None (zeros).
    return_final_states: also return the state after the last token.
    implementation: None (compiled Pallas on TPU/GPU, "xla" elsewhere and for float64),
      "pallas", "interpret" (the TPU kernels in the Pallas interpreter), "xla" or
      "reference".
    segment_ids: int [batch, seq] or None: packed rows; the state restarts from zero at
      every token whose id differs from the previous token's.
    block_head_dim: head_dim tile of the GPU kernels (power of two >= 16; default 64; the
      GPU kernels run one program per chunk and tile, on tensor cores: bfloat16/float16
      operands for 16-bit inputs, TF32x3 for float32); the TPU kernels take the whole
      head_dim (unpadded).
    precision: products of the TPU kernels: None ("bf16x2" for bfloat16 x, else "highest"),
      "highest" (float32 products at full precision) or "bf16x2" (bfloat16 operands with
      float32 accumulation; float32 states split into two bfloat16 halves).

  Returns:
    y [batch, seq, heads, head_dim] in x's dtype; with ``return_final_states`` also the
    final state [batch, heads, head_dim, d_state] in float32 (float64 for float64 x).
  """
  _validate(x, dt, A, B, C, D, z, dt_bias, initial_states, segment_ids)
  validation.check_positive_int(OP, "block_head_dim", block_head_dim, allow_none=True)
  platform = dispatch.platform_of(x, dt, B, C)
  cdt = numerics.compute_dtype(x)
  impl = dispatch.resolve_implementation(OP, implementation, platform,
                                         float64=cdt == jnp.float64)
  kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                initial_states=initial_states, return_final_states=return_final_states,
                segment_ids=segment_ids)
  if impl == "reference":
    return ssd_reference(x, dt, A, B, C, **kwargs)

  b, t, h, p = x.shape
  n = B.shape[3]
  init = (jnp.zeros((b, h, p, n), cdt) if initial_states is None
          else initial_states.astype(cdt))
  y, final = core.scalar_decay(
      x, effective_dt(dt, dt_bias, dt_softplus, cdt), A.astype(cdt), B, C,
      initial_states=init, D=D, z=z, segment_ids=segment_ids, implementation=impl,
      platform=platform, chunk_size=chunk_size, block_head_dim=block_head_dim,
      precision=precision, op=OP)
  return (y, final) if return_final_states else y
