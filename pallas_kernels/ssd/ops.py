"""Public SSD op (Mamba-2's state-space duality): validation, dispatch, custom VJP.

The Pallas backends (``tpu.py``, ``gpu.py``) share one module interface and work on
[batch, heads, seq, head_dim] arrays padded to whole chunks and to the head / state widths
their tiles need; this module computes the effective step sizes and the per-token log decays
a = dt' A, pads, transposes, calls them under a ``jax.custom_vjp`` (which forms the
chunk-local cumulative log decays and takes the kernels' gradient of ``a``) and slices the
padding off again. The skip term D x and the gate silu(z) are elementwise and left to XLA
(and its autodiff), outside the kernels. The XLA path (``xla.py``) is differentiated by
autodiff of a checkpointed scan over chunks whose exponents carry their own derivative
(``xla.chunk_exponents``). Both take the gradient of the per-token log decays ``a`` directly,
never as a reverse cumulative sum of d(cumulative decay), which cancels in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch, padding, validation
from pallas_kernels.ssd import xla
from pallas_kernels.ssd.reference import (compute_dtype, effective_dt, skip_and_gate,
                                          ssd_reference)

OP = "ssd"
LAYOUT_X = "[batch, seq, heads, head_dim]"
LAYOUT_DT = "[batch, seq, heads]"
LAYOUT_BC = "[batch, seq, n_groups, d_state]"
LAYOUT_STATE = "[batch, heads, head_dim, d_state]"


def _backend_module(name: str) -> ModuleType:
  return dispatch.backend_module(__package__, name)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one kernel call; hashable, so it rides as a nondiff argument."""
  backend: str
  chunk_size: int
  block_head_dim: int
  interpret: bool

  def kernel_kwargs(self) -> dict:
    return dict(chunk_size=self.chunk_size, block_head_dim=self.block_head_dim,
                interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd_core(x, dt, a, B, C, initial_states, run_ids, config: _Config):
  """The kernels on [b, h, t, .] arrays; ``a`` [b, h, t] the per-token log decays."""
  acum, acum_lo = xla.chunk_cumsums(a, config.chunk_size, axis=2)
  y, final, _ = _backend_module(config.backend).ssd_forward(
      x, dt, acum, acum_lo, B, C, initial_states, run_ids, return_states=False,
      **config.kernel_kwargs())
  return y, final


def _ssd_core_fwd(x, dt, a, B, C, initial_states, run_ids, config):
  acum, acum_lo = xla.chunk_cumsums(a, config.chunk_size, axis=2)
  y, final, states = _backend_module(config.backend).ssd_forward(
      x, dt, acum, acum_lo, B, C, initial_states, run_ids, return_states=True,
      **config.kernel_kwargs())
  return (y, final), (x, dt, acum, acum_lo, B, C, run_ids, states)


def _ssd_core_bwd(config, residuals, cotangents):
  x, dt, acum, acum_lo, B, C, run_ids, states = residuals
  d_y, d_final = cotangents
  # The kernels return d a directly (each exponent's cotangent summed over the tokens it
  # spans), not d acum: a reverse cumulative sum of d acum would cancel (see tpu.py).
  dx, ddt, da, dB, dC, d_initial = _backend_module(config.backend).ssd_backward(
      x, dt, acum, acum_lo, B, C, run_ids, states, d_y, d_final, **config.kernel_kwargs())
  return dx, ddt, da, dB, dC, d_initial, None


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


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


def _chunk_size(backend: str, module, requested, seq: int) -> int:
  """The chunk length to run: the request (or the backend default), shrunk for short inputs.

  XLA takes any positive size; the Pallas backends say which sizes their tiles allow.
  """
  validation.check_positive_int(OP, "chunk_size", requested, allow_none=True)
  if backend == "xla":
    size = xla.DEFAULT_CHUNK_SIZE if requested is None else requested
    return max(1, min(size, seq))
  size = module.DEFAULT_CHUNK_SIZE if requested is None else requested
  module.check_chunk_size(size)
  return module.shrink_chunk_size(size, seq)


def ssd(x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
        initial_states=None, return_final_states=False, implementation=None, segment_ids=None,
        block_head_dim=None):
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
    block_head_dim: head_dim tile of the GPU kernels (power of two >= 16; default 64, or
      less while batch * heads * tiles < 128, to fill the GPU); the TPU kernels take the
      whole (padded) head_dim.

  Returns:
    y [batch, seq, heads, head_dim] in x's dtype; with ``return_final_states`` also the
    final state [batch, heads, head_dim, d_state] in float32 (float64 for float64 x).
  """
  _validate(x, dt, A, B, C, D, z, dt_bias, initial_states, segment_ids)
  validation.check_positive_int(OP, "block_head_dim", block_head_dim, allow_none=True)
  platform = dispatch.platform_of(x, dt, B, C)
  impl = dispatch.resolve_implementation(OP, implementation, platform)
  cdt = compute_dtype(x)
  if cdt == jnp.float64:
    if implementation is None:
      impl = "xla"
    elif impl in ("pallas", "interpret"):
      raise ValueError(f"{OP}: float64 inputs run with implementation='xla' or 'reference' "
                       f"(or None, which picks 'xla' for them), got implementation={impl!r}.")
  kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                initial_states=initial_states, return_final_states=return_final_states,
                segment_ids=segment_ids)
  if impl == "reference":
    return ssd_reference(x, dt, A, B, C, **kwargs)

  b, t, h, p = x.shape
  n = B.shape[3]
  backend = "xla" if impl == "xla" else dispatch.pallas_backend(platform)
  module = None if backend == "xla" else _backend_module(backend)
  chunk = _chunk_size(backend, module, chunk_size, max(t, 1))
  block_p = None if module is None else module.block_head_dim(block_head_dim, p, b * h)
  init = (jnp.zeros((b, h, p, n), cdt) if initial_states is None
          else initial_states.astype(cdt))

  if 0 in (b, t, h, p, n):
    y = jnp.zeros(x.shape, cdt)
    final = init
  else:
    t_pad = padding.round_up(t, chunk)
    dt_eff = padding.pad_axis(effective_dt(dt, dt_bias, dt_softplus, cdt), 1, t_pad)
    a = xla.log_decays(dt_eff, A.astype(cdt))
    xp = padding.pad_axis(x, 1, t_pad)
    Bp = padding.pad_axis(B, 1, t_pad)
    Cp = padding.pad_axis(C, 1, t_pad)
    run_ids = None
    if segment_ids is not None:
      seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)), mode="edge")
      run_ids = xla.relative_run_ids(seg, chunk)
    if backend == "xla":
      y, final = xla.ssd_chunked(xp, dt_eff, a, Bp, Cp, init, run_ids, chunk_size=chunk)
    else:
      hp, ns = module.padded_head_dim(p, block_p), module.padded_state_dim(n)
      xk = padding.pad_axis(jnp.transpose(xp, (0, 2, 1, 3)), 3, hp)
      Bk = padding.pad_axis(jnp.transpose(Bp, (0, 2, 1, 3)), 3, ns)
      Ck = padding.pad_axis(jnp.transpose(Cp, (0, 2, 1, 3)), 3, ns)
      initk = padding.pad_axis(padding.pad_axis(init, 2, hp), 3, ns)
      config = _Config(backend=backend, chunk_size=chunk, block_head_dim=block_p,
                       interpret=(impl == "interpret"))
      heads_major = lambda a: jnp.transpose(a, (0, 2, 1)).astype(jnp.float32)
      y, final = _ssd_core(xk, heads_major(dt_eff), heads_major(a), Bk, Ck, initk, run_ids,
                           config)
      y = jnp.transpose(y[..., :p], (0, 2, 1, 3))
      final = final[:, :, :p, :n]
    y = y[:, :t].astype(cdt)
  y = skip_and_gate(y, x, D, z).astype(x.dtype)
  return (y, final) if return_final_states else y
