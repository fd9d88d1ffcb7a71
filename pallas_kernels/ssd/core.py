"""The chunked scalar-decay recurrence shared by SSD and lightning attention: dispatch, padding,
custom VJP.

Per batch row and head h (group g = h // (heads / groups)), with per-token log decays
a_t = dt_t A_h:

    H_t = exp(a_t) H_{t-1} + dt_t x_t ⊗ B_t,    y_t = H_t C_t  (+ D x_t, then * silu(z_t))

x, z [batch, seq, heads, P]; dt [batch, seq, heads] (the effective step sizes, in the compute
dtype); A [heads]; B, C [batch, seq, groups, N]; H [batch, heads, P, N]. SSD (Mamba-2) is this
with dt' = softplus(dt + dt_bias); lightning attention (S_t = λ S_{t-1} + k_t^T v_t,
o_t = q_t S_t) is it with x = v, B = k, C = q, one group per head, dt = 1 and A = log λ
(so S = H^T). One kernel stack serves both: ``tpu.py`` (Mosaic), ``gpu.py`` (Triton) and
``xla.py`` (chunked pure JAX, the CPU default and the float64 path).

:func:`scalar_decay` pads the sequence to whole chunks with tokens that neither decay nor feed
the state (dt = 0), turns segment ids into per-chunk run ids, transposes to each backend's
layout and calls it under a ``jax.custom_vjp`` that forms the chunk-local cumulative log decays
and takes the kernels' gradient of ``a`` directly (never as a reverse cumulative sum of
d(cumulative decay), which cancels in float32). On TPU, D x and the gate are fused into the
forward kernel (their gradients are elementwise XLA in the backward); elsewhere XLA applies
them.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch, padding, segments, validation
from pallas_kernels.ssd import xla
from pallas_kernels.ssd.reference import skip_and_gate

PRECISIONS = (None, "highest", "bf16x2")


def _backend_module(name: str) -> ModuleType:
  return dispatch.backend_module("pallas_kernels.ssd", name)


def default_precision(dtype) -> str:
  """"bf16x2" for bfloat16 inputs, "highest" otherwise."""
  return "bf16x2" if jnp.dtype(dtype) == jnp.bfloat16 else "highest"


# ----------------------------------------------------------------------------- TPU


@dataclasses.dataclass(frozen=True)
class _TpuConfig:
  plan: object  # tpu.Plan
  interpret: bool


def _tpu():
  return _backend_module("tpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _tpu_core(x, dt, a, B, C, init, D, z, run, config: _TpuConfig):
  """The TPU kernels on [b, h, t, P] / [b, g, t, N] / [b, g, rep, t] arrays."""
  acum, lo = xla.chunk_cumsums(a, config.plan.chunk_size, axis=3)
  y, final, _, _ = _tpu().scalar_decay_forward(
      x, dt, acum, lo, B, C, init, run, D, z, plan=config.plan, interpret=config.interpret)
  return y, final


def _tpu_core_fwd(x, dt, a, B, C, init, D, z, run, config):
  acum, lo = xla.chunk_cumsums(a, config.plan.chunk_size, axis=3)
  y, final, y_pre, states = _tpu().scalar_decay_forward(
      x, dt, acum, lo, B, C, init, run, D, z, plan=config.plan, interpret=config.interpret,
      save=True)
  return (y, final), (x, dt, acum, lo, B, C, run, states, D, z, y_pre)


def _tpu_core_bwd(config, residuals, cotangents):
  x, dt, acum, lo, B, C, run, states, D, z, y_pre = residuals
  d_out, d_final = cotangents
  f32 = jnp.float32
  dy = d_out.astype(f32)
  dz = dD = None
  if z is not None:  # out = y_pre * silu(z)
    zf = z.astype(f32)
    s = jax.nn.sigmoid(zf)
    dz = (dy * y_pre.astype(f32) * (s * (1.0 + zf * (1.0 - s)))).astype(z.dtype)
    dy = dy * (zf * s)
  if D is not None:  # y_pre = y + D x
    dD = jnp.sum(dy * x.astype(f32), axis=(0, 2), keepdims=True)[0].astype(D.dtype)
  dx, ddt, da, dB, dC, d_init = _tpu().scalar_decay_backward(
      x, dt, acum, lo, B, C, run, states, dy.astype(x.dtype), d_final, plan=config.plan,
      interpret=config.interpret)
  if D is not None:
    dx = (dx.astype(f32) + dy * D.astype(f32)).astype(x.dtype)
  return dx, ddt, da, dB, dC, d_init, dD, dz, None


_tpu_core.defvjp(_tpu_core_fwd, _tpu_core_bwd)


# ----------------------------------------------------------------------------- GPU


@dataclasses.dataclass(frozen=True)
class _GpuConfig:
  chunk_size: int
  block_head_dim: int
  interpret: bool

  def kwargs(self) -> dict:
    return dict(chunk_size=self.chunk_size, block_head_dim=self.block_head_dim,
                interpret=self.interpret)


def _gpu():
  return _backend_module("gpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gpu_core(x, dt, a, B, C, init, run, config: _GpuConfig):
  """The GPU kernels on [b, h, t, .] arrays; ``a`` [b, h, t] the per-token log decays."""
  acum, lo = xla.chunk_cumsums(a, config.chunk_size, axis=2)
  y, final, _ = _gpu().ssd_forward(x, dt, acum, lo, B, C, init, run, return_states=False,
                                   **config.kwargs())
  return y, final


def _gpu_core_fwd(x, dt, a, B, C, init, run, config):
  acum, lo = xla.chunk_cumsums(a, config.chunk_size, axis=2)
  y, final, states = _gpu().ssd_forward(x, dt, acum, lo, B, C, init, run, return_states=True,
                                        **config.kwargs())
  return (y, final), (x, dt, acum, lo, B, C, run, states)


def _gpu_core_bwd(config, residuals, cotangents):
  x, dt, acum, lo, B, C, run, states = residuals
  d_y, d_final = cotangents
  dx, ddt, da, dB, dC, d_init = _gpu().ssd_backward(x, dt, acum, lo, B, C, run, states, d_y,
                                                    d_final, **config.kwargs())
  return dx, ddt, da, dB, dC, d_init, None


_gpu_core.defvjp(_gpu_core_fwd, _gpu_core_bwd)


# ----------------------------------------------------------------------------- dispatch


def chunk_size_for(op: str, backend: str, requested, seq: int) -> int:
  """The chunk length to run: the request (or the backend default), shrunk for short inputs.

  XLA takes any positive size; the Pallas backends say which sizes their tiles allow.
  """
  validation.check_positive_int(op, "chunk_size", requested, allow_none=True)
  if backend == "xla":
    size = xla.DEFAULT_CHUNK_SIZE if requested is None else requested
    return max(1, min(size, seq))
  module = _backend_module(backend)
  size = module.DEFAULT_CHUNK_SIZE if requested is None else requested
  try:
    module.check_chunk_size(size)
  except ValueError as e:
    raise ValueError(str(e).replace("ssd:", f"{op}:", 1)) from None
  return module.shrink_chunk_size(size, seq)


def scalar_decay(x, dt, A, B, C, *, initial_states, D=None, z=None, segment_ids=None,
                 implementation: str, platform: str, chunk_size=None, block_head_dim=None,
                 precision=None, interval=None, heads_per_block=None, op: str = "ssd"):
  """The chunked recurrence of the module docstring, inputs validated by the caller.

  Args:
    x: [b, t, h, P]; B, C: [b, t, g, N] (h a multiple of g); float dtypes.
    dt: [b, t, h] effective step sizes in the compute dtype (float32, or float64).
    A: [h] log-decay rates in the compute dtype.
    initial_states: [b, h, P, N] in the compute dtype.
    D: [h] or [h, P], or None; z: like x, or None.
    segment_ids: int [b, t] or None (the state restarts where the id changes).
    implementation: "pallas", "interpret" or "xla" (resolved by the caller).
    platform: "tpu", "gpu" or "cpu" (which Pallas kernels "pallas"/"interpret" run).
    chunk_size: tokens per chunk (None: the backend's default: XLA 64, TPU 128, GPU 64).
    block_head_dim: GPU head_dim tile (None: default); ignored elsewhere.
    precision: TPU products: None (``default_precision`` of x), "highest" or "bf16x2".
    interval: TPU: chunks per saved state (None: 4); heads_per_block: TPU heads of a group
      per program (None: all that fit VMEM).
    op: the public op's name, for error messages.

  Returns:
    y [b, t, h, P] in x's dtype (D x and the gate applied), final state [b, h, P, N] in the
    compute dtype.
  """
  if precision not in PRECISIONS:
    raise ValueError(f"{op}: precision must be one of {PRECISIONS}, got {precision!r}.")
  validation.check_positive_int(op, "interval", interval, allow_none=True)
  validation.check_positive_int(op, "heads_per_block", heads_per_block, allow_none=True)
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  cdt = initial_states.dtype
  backend = "xla" if implementation == "xla" else dispatch.pallas_backend(platform)
  chunk = chunk_size_for(op, backend, chunk_size, max(t, 1))
  block_p = None
  if backend == "gpu":
    try:
      block_p = _gpu().block_head_dim(block_head_dim, p)
    except ValueError as e:
      raise ValueError(str(e).replace("ssd:", f"{op}:", 1)) from None
  else:
    validation.check_positive_int(op, "block_head_dim", block_head_dim, allow_none=True)
  if 0 in (b, t, h, p, n):
    return skip_and_gate(jnp.zeros(x.shape, cdt), x, D, z).astype(x.dtype), initial_states

  plan = None
  if backend == "tpu":
    plan = _tpu().make_plan(heads=h, groups=g, seq=t, head_dim=p, d_state=n,
                            itemsize=jnp.dtype(x.dtype).itemsize, chunk_size=chunk,
                            interval=interval, heads_per_block=heads_per_block,
                            precision=precision or default_precision(x.dtype))
    t_pad = plan.padded_len(t)
  else:
    t_pad = padding.round_up(t, chunk)
  dt = padding.pad_axis(dt, 1, t_pad)
  a = xla.log_decays(dt, A.astype(cdt))
  xp, Bp, Cp = (padding.pad_axis(v, 1, t_pad) for v in (x, B, C))
  run_ids = None
  if segment_ids is not None:
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)), mode="edge")
    run_ids = segments.relative_run_ids(seg, chunk)

  if backend == "xla":
    y, final = xla.ssd_chunked(xp, dt, a, Bp, Cp, initial_states, run_ids, chunk_size=chunk)
    y = skip_and_gate(y[:, :t].astype(cdt), x, D, z).astype(x.dtype)
    return y, final

  heads_major = lambda v: jnp.transpose(v, (0, 2, 1, 3))
  rows = lambda v: jnp.transpose(v, (0, 2, 1)).astype(jnp.float32)  # [b, h, t]
  if backend == "gpu":
    hp, ns = _gpu().padded_head_dim(p, block_p), _gpu().padded_state_dim(n)
    xk = padding.pad_axis(heads_major(xp), 3, hp)
    Bk, Ck = (padding.pad_axis(heads_major(v), 3, ns) for v in (Bp, Cp))
    initk = padding.pad_axis(padding.pad_axis(initial_states, 2, hp), 3, ns)
    config = _GpuConfig(chunk_size=chunk, block_head_dim=block_p,
                        interpret=implementation == "interpret")
    y, final = _gpu_core(xk, rows(dt), rows(a), Bk, Ck, initk, run_ids, config)
    y = jnp.transpose(y[..., :p], (0, 2, 1, 3))[:, :t].astype(cdt)
    y = skip_and_gate(y, x, D, z).astype(x.dtype)
    return y, final[:, :, :p, :n]

  group_rows = lambda v: rows(v).reshape(b, g, h // g, t_pad)
  Dk = None
  if D is not None:
    Dk = jnp.broadcast_to((D[:, None] if D.ndim == 1 else D).astype(jnp.float32), (h, p))
    Dk = Dk.reshape(h, 1, p)
  zk = None if z is None else heads_major(padding.pad_axis(z, 1, t_pad))
  runk = None if run_ids is None else run_ids.astype(jnp.float32).reshape(b, 1, t_pad)
  config = _TpuConfig(plan=plan, interpret=implementation == "interpret")
  y, final = _tpu_core(heads_major(xp), group_rows(dt), group_rows(a), heads_major(Bp),
                       heads_major(Cp), initial_states.astype(jnp.float32), Dk, zk, runk,
                       config)
  return jnp.transpose(y, (0, 2, 1, 3))[:, :t], final
