"""Public selective-scan op: validation, dispatch on ``implementation``, custom VJP.

The Pallas backends (``tpu.py``, ``gpu.py``) share one module interface and work on inputs
padded to whole chunks along the sequence and to whole channel blocks inside each group of
channels; this module pads, calls them under a ``jax.custom_vjp`` whose backward is the
backend's backward kernel, and slices the padding off again. The XLA path (``xla.py``) is
differentiated by autodiff of its checkpointed chunked formulation.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch, numerics, padding, segments, validation
from pallas_kernels.selective_scan import xla as xla_backend
from pallas_kernels.selective_scan.reference import selective_scan_reference

OP = "selective_scan"
LAYOUT_X = "[batch, seq, d_inner]"
LAYOUT_BC = "[batch, seq, d_state] or [batch, seq, n_groups, d_state]"


def _backend_module(name: str) -> ModuleType:
  return dispatch.backend_module(__package__, name)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one Pallas call; hashable (a nondiff argument)."""
  backend: str
  seq_len: int
  delta_softplus: bool
  chunk: int
  block_d: int
  block_d_bwd: int
  interpret: bool
  window: int | None = None  # GPU: tokens per register window (``chunk`` saves states)

  def kwargs(self, backward: bool) -> dict:
    extra = {} if self.window is None else dict(window=self.window)
    return dict(seq_len=self.seq_len, delta_softplus=self.delta_softplus, chunk=self.chunk,
                block_d=self.block_d_bwd if backward else self.block_d,
                interpret=self.interpret, **extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _scan(u, delta, A, B, C, D, z, bias, h0, resets, config: _Config):
  y, final, _ = _backend_module(config.backend).forward(
      u, delta, A, B, C, D, z, bias, h0, resets, **config.kwargs(backward=False))
  return y, final


def _scan_fwd(u, delta, A, B, C, D, z, bias, h0, resets, config):
  y, final, hs = _backend_module(config.backend).forward(
      u, delta, A, B, C, D, z, bias, h0, resets, **config.kwargs(backward=False))
  return (y, final), (u, delta, A, B, C, D, z, bias, h0, resets, hs)


def _scan_bwd(config, residuals, cotangents):
  dy, d_final = cotangents
  grads = _backend_module(config.backend).backward(
      *residuals, dy, d_final, **config.kwargs(backward=True))
  return (*grads, None)


_scan.defvjp(_scan_fwd, _scan_bwd)


# --------------------------------------------------------------------------- validation


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids, op=OP):
  validation.check_rank(op, "u", u, 3, LAYOUT_X)
  b, seq, d = u.shape
  validation.check_rank(op, "delta", delta, 3, LAYOUT_X)
  validation.check_shape(op, "delta", delta, u.shape, f"{LAYOUT_X} (the shape of u)")
  validation.check_rank(op, "A", A, 2, "[d_inner, d_state]")
  if A.shape[0] != d:
    raise ValueError(f"{op}: A must be [d_inner, d_state] with d_inner={d} (from u "
                     f"{tuple(u.shape)}), got {tuple(A.shape)}.")
  n = A.shape[1]
  if n == 0:
    raise ValueError(f"{op}: d_state (A.shape[1]) must be positive, got A {tuple(A.shape)}.")
  for name, x in (("B", B), ("C", C)):
    if not hasattr(x, "shape") or x.ndim not in (3, 4):
      raise ValueError(f"{op}: {name} must be {LAYOUT_BC}, got "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
    expected = (b, seq, n) if x.ndim == 3 else (b, seq, x.shape[2], n)
    if tuple(x.shape) != expected:
      raise ValueError(f"{op}: {name} must be {LAYOUT_BC} with batch={b}, seq={seq}, "
                       f"d_state={n}, got {tuple(x.shape)}.")
  if B.shape != C.shape:
    raise ValueError(f"{op}: B and C must have the same shape, got B {tuple(B.shape)} and "
                     f"C {tuple(C.shape)}.")
  if B.ndim == 4:
    g = B.shape[2]
    if g == 0 or d % g:
      raise ValueError(f"{op}: d_inner ({d}) must be a multiple of n_groups ({g}, from B "
                       f"{tuple(B.shape)}).")
  for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
    validation.check_float_dtype(op, name, x)
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None:
      validation.check_rank(op, name, x, 1, "[d_inner]")
      validation.check_shape(op, name, x, (d,), "[d_inner]")
      validation.check_float_dtype(op, name, x)
  if z is not None:
    validation.check_rank(op, "z", z, 3, LAYOUT_X)
    validation.check_shape(op, "z", z, u.shape, f"{LAYOUT_X} (the shape of u)")
    validation.check_float_dtype(op, "z", z)
  if initial_state is not None:
    validation.check_rank(op, "initial_state", initial_state, 3, "[batch, d_inner, d_state]")
    validation.check_shape(op, "initial_state", initial_state, (b, d, n),
                           "[batch, d_inner, d_state]")
    validation.check_float_dtype(op, "initial_state", initial_state)
  if segment_ids is not None:
    validation.check_rank(op, "segment_ids", segment_ids, 2, "[batch, seq]")
    validation.check_int_dtype(op, "segment_ids", segment_ids)
    validation.check_shape(op, "segment_ids", segment_ids, (b, seq), "[batch, seq]")


def _check_bool(name, value, op=OP):
  if not isinstance(value, bool):
    raise ValueError(f"{op}: {name} must be a bool, got {value!r}.")


def _tpu_sizes(module, seq, cpg, n, chunk_size, block_d, block_d_bwd, op=OP):
  """(chunk, block_d, block_d_bwd, padded channels per group) for the TPU kernels.

  Defaults keep the backward's VMEM state buffer [chunk, n_pad, block_d_bwd] float32 within
  ``module.STATE_BUFFER_BYTES``: a large d_state gets a shorter chunk and narrower blocks.
  """
  n_pad = padding.round_up(n, module.SUBLANES)
  budget = module.STATE_BUFFER_BYTES
  if chunk_size is None:
    fit = budget // (n_pad * module.CHANNEL_MULTIPLE * 4)
    chunk = min(module.DEFAULT_CHUNK, max(module.CHUNK_MULTIPLE,
                                          fit // module.CHUNK_MULTIPLE * module.CHUNK_MULTIPLE))
  else:
    chunk = chunk_size
  validation.check_positive_int(op, "chunk_size", chunk)
  if chunk % module.CHUNK_MULTIPLE:
    raise ValueError(f"{op}: chunk_size must be a multiple of {module.CHUNK_MULTIPLE} for the "
                     f"TPU kernels (bfloat16 tiles hold 16 rows), got {chunk}.")
  chunk = min(chunk, padding.round_up(seq, module.CHUNK_MULTIPLE))
  cpg_pad = padding.round_up(cpg, module.CHANNEL_MULTIPLE)
  blocks = []
  for name, requested, default in (("block_d", block_d, module.DEFAULT_BLOCK_D),
                                   ("block_d_bwd", block_d_bwd, module.DEFAULT_BLOCK_D_BWD)):
    size = default if requested is None else requested
    validation.check_positive_int(op, name, size)
    if size % module.CHANNEL_MULTIPLE:
      raise ValueError(f"{op}: {name} must be a multiple of {module.CHANNEL_MULTIPLE} for the "
                       f"TPU kernels (channels are on lanes), got {size}.")
    size = min(size, cpg_pad)  # A block wider than the (padded) channels takes them all.
    if requested is not None and cpg_pad % size:
      fits = [s for s in range(module.CHANNEL_MULTIPLE, cpg_pad + 1, module.CHANNEL_MULTIPLE)
              if cpg_pad % s == 0]
      raise ValueError(
          f"{op}: {name}={requested} does not divide the {cpg_pad} channels per group the TPU "
          f"kernels run ({cpg} padded to a multiple of {module.CHANNEL_MULTIPLE}); use one of "
          f"{fits} (or None for the default).")
    while cpg_pad % size or (
        name == "block_d_bwd" and requested is None and size > module.CHANNEL_MULTIPLE
        and chunk * n_pad * size * 4 > budget):
      size -= module.CHANNEL_MULTIPLE  # A multiple of 128 that divides the channels.
    blocks.append(size)
  for name, size, backward in (("block_d", blocks[0], False), ("block_d_bwd", blocks[1], True)):
    need = module.vmem_bytes(chunk, size, n, backward)
    if need > module.VMEM_LIMIT_BYTES:
      raise ValueError(
          f"{op}: chunk_size={chunk} with {name}={size} and d_state={n} needs about "
          f"{need / 2 ** 20:.1f} MiB of VMEM in the TPU {'backward' if backward else 'forward'}"
          f" kernel, over its {module.VMEM_LIMIT_BYTES / 2 ** 20:.0f} MiB; use a smaller "
          f"chunk_size or {name} (or leave them None for sizes that fit).")
  return chunk, blocks[0], blocks[1], cpg_pad


def _gpu_sizes(module, seq, cpg, n, chunk_size, block_d, block_d_bwd, op=OP):
  """(window, block_d, block_d_bwd, padded channels per group, chunk) for the GPU kernels.

  ``chunk`` (``chunk_size``, default ``module.DEFAULT_STATE_CHUNK``) is the interval of the
  states the forward saves, rounded up to a whole number of register windows and shrunk to
  the sequence; ``window`` (``module.default_chunk``: 16 up to d_state 64, 8 at 128, at most
  ``chunk_size``) fits the backward's window + 1 states of [block_d_bwd, d_state] float32 in
  registers. The sequence is padded to whole windows only.
  """
  validation.check_positive_int(op, "chunk_size", chunk_size, allow_none=True)
  blocks = []
  for name, requested, default in (("block_d", block_d, module.DEFAULT_BLOCK_D),
                                   ("block_d_bwd", block_d_bwd, module.DEFAULT_BLOCK_D_BWD)):
    size = default if requested is None else requested
    validation.check_positive_int(op, name, size)
    if size < module.CHANNEL_MULTIPLE or size & (size - 1):
      raise ValueError(f"{op}: {name} must be a power of two >= {module.CHANNEL_MULTIPLE} for "
                       f"the GPU kernels (Triton tiles), got {size}.")
    blocks.append(min(size, max(module.CHANNEL_MULTIPLE, padding.next_power_of_2(cpg))))
  cpg_pad = padding.round_up(cpg, max(blocks))
  chunk = module.DEFAULT_STATE_CHUNK if chunk_size is None else chunk_size
  window = min(module.default_chunk(blocks[1], n), chunk, max(seq, 1))
  chunk = min(padding.round_up(chunk, window), padding.round_up(max(seq, 1), window))
  return window, blocks[0], blocks[1], cpg_pad, chunk


def _regroup(x, axis, g, cpg, cpg_pad):
  """Pads the channel axis of ``x`` group by group: d = g * cpg -> g * cpg_pad."""
  if cpg == cpg_pad:
    return x
  shape = x.shape
  x = x.reshape(shape[:axis] + (g, cpg) + shape[axis + 1:])
  x = padding.pad_axis(x, axis + 1, cpg_pad)
  return x.reshape(shape[:axis] + (g * cpg_pad,) + shape[axis + 1:])


def _ungroup(x, axis, g, cpg, cpg_pad):
  """Inverse of :func:`_regroup`."""
  if cpg == cpg_pad:
    return x
  shape = x.shape
  x = x.reshape(shape[:axis] + (g, cpg_pad) + shape[axis + 1:])
  x = jax.lax.slice_in_dim(x, 0, cpg, axis=axis + 1)
  return x.reshape(shape[:axis] + (g * cpg,) + shape[axis + 1:])


# --------------------------------------------------------------------------- public op


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, implementation=None, *,
                   segment_ids=None, chunk_size=None, block_d=None, block_d_bwd=None):
  """Mamba-1's selective scan (S6), channels last.

  With dt = delta + delta_bias (then softplus when ``delta_softplus``), for channel i and
  state j:

      h_t[i, j] = exp(dt_t[i] A[i, j]) h_{t-1}[i, j] + dt_t[i] B_t[g(i), j] u_t[i]
      y_t[i]    = sum_j C_t[g(i), j] h_t[i, j] + D[i] u_t[i],   then y <- y * silu(z)

  g(i) = i // (d_inner / n_groups) (a single group when B, C have no group axis).

  Args:
    u, delta: [batch, seq, d_inner].
    A: [d_inner, d_state], real (Mamba: A = -exp(A_log) < 0).
    B, C: [batch, seq, d_state] or grouped [batch, seq, n_groups, d_state].
    D: [d_inner] skip connection, or None.
    z: [batch, seq, d_inner] gate, or None.
    delta_bias: [d_inner], added to delta before the softplus, or None.
    delta_softplus: apply softplus to dt.
    initial_state: [batch, d_inner, d_state] state before the first token (None: zeros);
      with ``segment_ids`` it applies to the first segment of each row only.
    return_final_state: also return the state after the last token of each row.
    implementation: None (compiled Pallas on TPU/GPU, "xla" elsewhere and for float64),
      "pallas", "interpret", "xla" or "reference". float64 inputs: "xla" and "reference"
      only (a ValueError says so).
    segment_ids: int [batch, seq] packed rows: the state restarts from zero at every token
      whose id differs from the previous token's.
    chunk_size: tokens per chunk: the associative-scan chunk of the XLA path (default 64),
      the time tile of the TPU kernels (a multiple of 16, default 128, less for
      d_state > 64) or the interval of the states the GPU forward saves (default 2048,
      rounded up to whole register windows of 16 tokens, 8 from d_state 128; the backward
      recomputes the states inside each chunk; chunk_size <= the window saves every
      window's state and needs no backward workspace). Shorter sequences shrink it;
      lengths need not be multiples (padded tokens neither decay nor feed the state). The
      result does not depend on it.
    block_d, block_d_bwd: channels per program of the Pallas forward / backward kernels
      (TPU: multiples of 128 that divide the channels per group padded to a multiple of
      128, default 512 / 256, a ValueError lists the sizes that do; GPU: powers of two
      >= 16, default 16). A block wider than the channels takes them all.

  Returns:
    y [batch, seq, d_inner] in u's dtype, and with ``return_final_state`` the final state
    [batch, d_inner, d_state] in float32 (float64 for float64 inputs on "xla"/"reference").
  """
  _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
  _check_bool("delta_softplus", delta_softplus)
  _check_bool("return_final_state", return_final_state)
  platform = dispatch.platform_of(u, delta, A, B, C)
  cdt = numerics.compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
  impl = dispatch.resolve_implementation(OP, implementation, platform,
                                         float64=cdt == jnp.float64)
  if impl == "reference":
    return selective_scan_reference(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
        return_final_state, segment_ids=segment_ids)

  grouped = B.ndim == 4
  Bg = B if grouped else B[:, :, None]
  Cg = C if grouped else C[:, :, None]
  resets = segments.run_starts(segment_ids)

  if impl == "xla":
    validation.check_positive_int(OP, "chunk_size", chunk_size, allow_none=True)
    for name, value in (("block_d", block_d), ("block_d_bwd", block_d_bwd)):
      validation.check_positive_int(OP, name, value, allow_none=True)
    y, final = xla_backend.selective_scan_xla(
        u, delta, A, Bg, Cg, D, z, delta_bias, initial_state, resets,
        delta_softplus=delta_softplus,
        chunk=xla_backend.DEFAULT_CHUNK if chunk_size is None else chunk_size,
        method="sequential" if platform == "cpu" else "associative")
    return (y, final) if return_final_state else y

  y, final = run_pallas(u, delta, A, Bg, Cg, D, z, delta_bias, initial_state, resets,
                        backend=dispatch.pallas_backend(platform),
                        interpret=(impl == "interpret"), delta_softplus=delta_softplus,
                        chunk_size=chunk_size, block_d=block_d, block_d_bwd=block_d_bwd)
  return (y, final) if return_final_state else y


def run_pallas(u, delta, A, B, C, D, z, delta_bias, initial_state, resets, *, backend,
               interpret, delta_softplus, chunk_size=None, block_d=None, block_d_bwd=None):
  """The Pallas kernels of ``backend`` ("tpu" or "gpu") on validated inputs, padded here.

  B, C are grouped [batch, seq, n_groups, d_state]; resets bool [batch, seq] or None.
  Returns (y, final state). Tests call this to run the GPU kernels in interpret mode.
  """
  b, seq, d = u.shape
  g, n = B.shape[2], A.shape[1]
  module = _backend_module(backend)
  cpg = d // g
  sizes = _tpu_sizes if backend == "tpu" else _gpu_sizes
  h0_f32 = None if initial_state is None else initial_state.astype(jnp.float32)
  if seq == 0 or b == 0 or d == 0:
    # Nothing to tile (no channels would make the block sizes 0): the explicit sizes are
    # still checked, as for one token of one channel.
    sizes(module, max(seq, 1), max(cpg, 1), n, chunk_size, block_d, block_d_bwd)
    final = jnp.zeros((b, d, n), jnp.float32) if h0_f32 is None else h0_f32
    return jnp.zeros(u.shape, u.dtype), final
  window = None
  if backend == "tpu":
    chunk, bd, bd_bwd, cpg_pad = sizes(module, seq, cpg, n, chunk_size, block_d, block_d_bwd)
  else:  # The GPU kernels save a state every chunk and pad to whole register windows.
    window, bd, bd_bwd, cpg_pad, chunk = sizes(module, seq, cpg, n, chunk_size, block_d,
                                               block_d_bwd)

  seq_pad = padding.round_up(seq, chunk if window is None else window)
  regroup = functools.partial(_regroup, g=g, cpg=cpg, cpg_pad=cpg_pad)
  tokens = lambda x: None if x is None else regroup(padding.pad_axis(x, 1, seq_pad), 2)
  vector = lambda x: regroup(jnp.zeros((d,), jnp.float32) if x is None
                             else x.astype(jnp.float32), 0)
  config = _Config(backend=backend, seq_len=seq, delta_softplus=delta_softplus, chunk=chunk,
                   block_d=bd, block_d_bwd=bd_bwd, interpret=interpret, window=window)
  y, final = _scan(
      tokens(u), tokens(delta), regroup(A.astype(jnp.float32), 0),
      padding.pad_axis(B, 1, seq_pad), padding.pad_axis(C, 1, seq_pad),
      vector(D), tokens(z), vector(delta_bias),
      None if h0_f32 is None else regroup(h0_f32, 1),
      None if resets is None else padding.pad_axis(resets, 1, seq_pad, False), config)
  return _ungroup(y[:, :seq], 2, g, cpg, cpg_pad), _ungroup(final, 1, g, cpg, cpg_pad)
