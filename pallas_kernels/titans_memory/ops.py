"""Public Titans memory op: validation, dispatch, custom VJP.

The Pallas backends (``tpu.py``, ``gpu.py``) run the linear memory (one matrix per head) on
[batch, heads, seq, d] arrays padded to whole chunks; this module turns the gates into what
they consume (theta, and the per-token log gates log(1 - alpha) and log eta, whose
cumulative sums the kernels form per chunk), transposes, pads, calls them under a
``jax.custom_vjp`` and slices the padding off again. The gates' conversion is differentiated
by XLA outside the kernels. The 2-layer MLP memory (the paper's deep memory) has TPU kernels
of its own (``tpu_mlp.py``, a second custom VJP, ``_mlp_core``, around them), run on TPU and
under implementation="interpret" off GPU; on GPU it runs the XLA path (the GPU kernels run
the linear memory only). Deeper MLP memories, 2-layer memories too large for the TPU
kernels' VMEM (``tpu_mlp.size_problem``) or with an empty layer, and float64 run the chunked
XLA path (``xla.py``), differentiated by autodiff of a checkpointed scan over chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch, padding, validation
from pallas_kernels._common.numerics import compute_dtype
from pallas_kernels.titans_memory import xla
from pallas_kernels.titans_memory.reference import (as_weight_tuple, titans_memory_reference,
                                                    zero_state)

OP = "titans_memory"
LAYOUT_QK = "[batch, seq, heads, d_k]"
LAYOUT_V = "[batch, seq, heads, d_v]"
LAYOUT_GATE = "[batch, seq, heads]"
LAYOUT_STATE = "[batch, heads, d_in, d_out]"


def _backend_module(name: str) -> ModuleType:
  return dispatch.backend_module(__package__, name)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one kernel call; hashable, so it rides as a nondiff argument."""
  backend: str
  chunk_size: int
  seq_len: int  # valid tokens; the rest of the last chunk is padding
  interpret: bool

  def kernel_kwargs(self) -> dict:
    return dict(chunk_size=self.chunk_size, seq_len=self.seq_len, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _linear_core(q, k, v, theta, log_keep, log_eta, m0, s0, config: _Config):
  """The kernels on [b, h, t, .] arrays and [b, h, t] float32 gates."""
  o, final, _ = _backend_module(config.backend).titans_forward(
      q, k, v, theta, log_keep, log_eta, m0, s0, return_states=False, **config.kernel_kwargs())
  return o, final


def _linear_core_fwd(q, k, v, theta, log_keep, log_eta, m0, s0, config):
  o, final, states = _backend_module(config.backend).titans_forward(
      q, k, v, theta, log_keep, log_eta, m0, s0, return_states=True, **config.kernel_kwargs())
  return (o, final), (q, k, v, theta, log_keep, log_eta, m0, s0, states)


def _linear_core_bwd(config, residuals, cotangents):
  q, k, v, theta, log_keep, log_eta, m0, s0, states = residuals
  d_o, (d_m, d_s) = cotangents
  return _backend_module(config.backend).titans_backward(
      q, k, v, theta, log_keep, log_eta, m0, s0, states, d_o, d_m, d_s,
      **config.kernel_kwargs())


_linear_core.defvjp(_linear_core_fwd, _linear_core_bwd)


def _mlp_module() -> ModuleType:
  """The TPU kernels of the 2-layer MLP memory (imported at call time, as the backends)."""
  return importlib.import_module(f"{__package__}.tpu_mlp")


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _mlp_core(q, k, v, theta, log_keep, log_eta, w1, w2, s1, s2, config: _Config):
  """The 2-layer MLP kernels (TPU only) on [b, h, t, .] arrays and [b, h, t] float32 gates;
  returns o and the final (W1, W2, S1, S2)."""
  o, final, _ = _mlp_module().titans_mlp_forward(
      q, k, v, theta, log_keep, log_eta, w1, w2, s1, s2, return_states=False,
      **config.kernel_kwargs())
  return o, final


def _mlp_core_fwd(q, k, v, theta, log_keep, log_eta, w1, w2, s1, s2, config):
  o, final, states = _mlp_module().titans_mlp_forward(
      q, k, v, theta, log_keep, log_eta, w1, w2, s1, s2, return_states=True,
      **config.kernel_kwargs())
  return (o, final), (q, k, v, theta, log_keep, log_eta, states)


def _mlp_core_bwd(config, residuals, cotangents):
  q, k, v, theta, log_keep, log_eta, states = residuals
  d_o, d_final = cotangents
  dq, dk, dv, d_theta, d_lk, d_le, d_init = _mlp_module().titans_mlp_backward(
      q, k, v, theta, log_keep, log_eta, states, d_o, d_final, **config.kernel_kwargs())
  return (dq, dk, dv, d_theta, d_lk, d_le, *d_init)


_mlp_core.defvjp(_mlp_core_fwd, _mlp_core_bwd)


def _check_state(initial_state, b, h, d_k, d_v):
  """The (M, S) structure: two arrays [b, h, d_k, d_v], or two equal-length tuples of
  [b, h, d_{l-1}, d_l] chaining d_k to d_v. Returns the depth."""
  if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
    raise ValueError(f"{OP}: initial_state must be a pair (M, S), got "
                     f"{type(initial_state).__name__}.")
  m0, s0 = initial_state
  if isinstance(m0, (tuple, list)) != isinstance(s0, (tuple, list)):
    raise ValueError(f"{OP}: initial_state's M and S must both be arrays (linear memory) or "
                     "both tuples of arrays (MLP memory).")
  weights, moments = as_weight_tuple(m0), as_weight_tuple(s0)
  if not weights or len(weights) != len(moments):
    raise ValueError(f"{OP}: initial_state's M and S must hold the same number (>= 1) of "
                     f"weight matrices, got {len(weights)} and {len(moments)}.")
  d_in = d_k
  for l, (w, s) in enumerate(zip(weights, moments)):
    for name, a in ((f"M[{l}]", w), (f"S[{l}]", s)):
      validation.check_rank(OP, f"initial_state {name}", a, 4, LAYOUT_STATE)
      validation.check_float_dtype(OP, f"initial_state {name}", a)
    last = l == len(weights) - 1
    if w.shape[:3] != (b, h, d_in) or (last and w.shape[3] != d_v):
      want = f"({b}, {h}, {d_in}, {d_v if last else 'd_out'})"
      raise ValueError(f"{OP}: initial_state M[{l}] must have shape {want} {LAYOUT_STATE} "
                       f"(batch, heads, d_k, d_v from q and v; layers chain), got "
                       f"{tuple(w.shape)}.")
    validation.check_shape(OP, f"initial_state S[{l}]", s, w.shape, "(the shape of M)")
    d_in = w.shape[3]
  return len(weights)


def _validate(q, k, v, lr, momentum, decay, initial_state, chunk_size):
  validation.check_rank(OP, "q", q, 4, LAYOUT_QK)
  validation.check_rank(OP, "k", k, 4, LAYOUT_QK)
  validation.check_rank(OP, "v", v, 4, LAYOUT_V)
  for name, a in (("lr", lr), ("momentum", momentum), ("decay", decay)):
    validation.check_rank(OP, name, a, 3, LAYOUT_GATE)
  for name, a in (("q", q), ("k", k), ("v", v), ("lr", lr), ("momentum", momentum),
                  ("decay", decay)):
    validation.check_float_dtype(OP, name, a)
  validation.check_same_dtype(OP, ("q", "k", "v"), (q, k, v))
  b, t, h, d_k = q.shape
  validation.check_shape(OP, "k", k, q.shape, f"{LAYOUT_QK} (the shape of q)")
  if v.shape[:3] != (b, t, h):
    raise ValueError(f"{OP}: v must be {LAYOUT_V} with batch, seq, heads = {(b, t, h)} like q "
                     f"{tuple(q.shape)}, got {tuple(v.shape)}.")
  for name, a in (("lr", lr), ("momentum", momentum), ("decay", decay)):
    validation.check_shape(OP, name, a, (b, t, h), f"{LAYOUT_GATE} (from q {tuple(q.shape)})")
  validation.check_positive_int(OP, "chunk_size", chunk_size, allow_none=True)
  if initial_state is None:
    return 1
  return _check_state(initial_state, b, h, d_k, v.shape[3])


def _pallas_unsupported(backend, cdt, depth, chunk, dims):
  """Why the Pallas kernels of ``backend`` cannot run this call, or None. ``dims``: the
  layer widths (d_k, d_1, ..., d_v)."""
  if cdt == jnp.float64:
    return "float64 inputs"
  if depth > 2:
    return (f"an MLP memory of depth {depth} (they run the linear memory and, on TPU, the "
            "2-layer MLP)")
  if depth == 2:
    if backend != "tpu":
      return ("a 2-layer MLP memory on GPU (the GPU kernels run the linear memory; the TPU "
              "kernels, also under implementation='interpret' off GPU, run the MLP)")
    return _mlp_module().size_problem(*dims) or _mlp_module().chunk_size_problem(chunk)
  return _backend_module(backend).chunk_size_problem(chunk)


def titans_memory(q, k, v, lr, momentum, decay, *, chunk_size=None, initial_state=None,
                  return_final_state=False, implementation=None):
  """Titans' neural long-term memory (linear or MLP), chunked mini-batch rule.

  Per batch row and head, with l(M; k, v) = 1/2 ||M(k) - v||^2 and chunks of ``chunk_size``
  tokens (s the first token of t's chunk):

      G_t = grad_M l(M_{s-1}; k_t, v_t)
      S_t = momentum_t S_{t-1} - lr_t G_t
      M_t = (1 - decay_t) M_{t-1} + S_t
      o_t = M_t(q_t)                        (read after the write at the same step)

  ``chunk_size = 1`` is the fully sequential rule. Linear memory: M(x) = x M, M [d_k, d_v]
  per head. MLP memory (``initial_state`` with tuples): M(x) = silu(... silu(x W_1) ...) W_L,
  each W_l with its own momentum and the same gates. The result depends on ``chunk_size``
  (it is part of the rule), not on the backend beyond rounding.

  Args:
    q, k: [batch, seq, heads, d_k]; v: [batch, seq, heads, d_v]; one dtype.
    lr, momentum, decay: theta, eta, alpha [batch, seq, heads], in [0, 1] (any float
      dtype; used in float32). The decays run in log space: a momentum or 1 - decay of
      exactly 0 is taken as the smallest normal float (lr 0 is exact). Values outside
      [0, 1] are not checked (they are data).
    chunk_size: tokens per chunk; None: 64. It is part of the rule, so no backend changes
      it: "xla" and "reference" take any positive size; the Pallas kernels tile multiples
      of 8 up to 256 (TPU; up to 128 for the 2-layer MLP memory) or powers of two from 16
      to 128 (GPU); other sizes run "xla" under None and are a ValueError under
      "pallas"/"interpret".
    initial_state: (M, S) before the first token, or None (linear memory at zero).
      Linear: M, S each [batch, heads, d_k, d_v]. MLP: M, S each a tuple
      (W_1 [batch, heads, d_k, d_1], ..., W_L [batch, heads, d_{L-1}, d_v]).
    return_final_state: also return (M, S) after the last token.
    implementation: None (compiled Pallas on TPU/GPU for the linear memory and on TPU for
      the 2-layer MLP memory with d_k, d_v <= 128 and d_h <= 256; "xla" for deeper MLP
      memories, the 2-layer one on GPU or beyond those sizes,
      float64 and CPU), "pallas", "interpret" (the TPU kernels in the Pallas interpreter),
      "xla" or "reference".

  Returns:
    o [batch, seq, heads, d_v] in q's dtype; with ``return_final_state`` also (M, S) in the
    structure of ``initial_state``, float32 (float64 for float64 inputs).
  """
  depth = _validate(q, k, v, lr, momentum, decay, initial_state, chunk_size)
  chunk = xla.DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
  platform = dispatch.platform_of(q, k, v)
  impl = dispatch.resolve_implementation(OP, implementation, platform)
  cdt = compute_dtype(q)
  dims = (q.shape[3], v.shape[3])  # the layer widths d_k, d_1, ..., d_v
  if initial_state is not None:
    dims = (q.shape[3],) + tuple(w.shape[3] for w in as_weight_tuple(initial_state[0]))
  if impl in ("pallas", "interpret"):
    backend = dispatch.pallas_backend(platform)
    unsupported = _pallas_unsupported(backend, cdt, depth, chunk, dims)
    if unsupported and implementation is not None:
      raise ValueError(f"{OP}: the Pallas kernels cannot run {unsupported}; use "
                       f"implementation='xla' or 'reference' (or None, which picks 'xla' for "
                       f"it), got implementation={impl!r}.")
    if unsupported:
      impl = "xla"
  if depth == 2 and 0 in dims and impl in ("pallas", "interpret"):
    impl = "xla"  # an empty layer: nothing for the kernels to tile (the XLA path is exact)
  if impl == "reference":
    return titans_memory_reference(q, k, v, lr, momentum, decay, chunk_size=chunk,
                                   initial_state=initial_state,
                                   return_final_state=return_final_state)
  b, t, h, d_k = q.shape
  d_v = v.shape[3]
  if initial_state is None:
    initial_state = zero_state(b, h, d_k, d_v, cdt)
  is_tuple = isinstance(initial_state[0], (tuple, list))
  weights = tuple(w.astype(cdt) for w in as_weight_tuple(initial_state[0]))
  moments = tuple(s.astype(cdt) for s in as_weight_tuple(initial_state[1]))

  if t == 0 or 0 in (b, h):
    o, final = jnp.zeros(v.shape, q.dtype), (weights, moments)
  else:
    heads_major = lambda a: jnp.moveaxis(a, 2, 1)  # [b, t, h, ...] -> [b, h, t, ...]
    theta = heads_major(lr).astype(cdt)
    log_keep = xla.log_gate(heads_major(1 - decay.astype(cdt)), cdt)
    log_eta = xla.log_gate(heads_major(momentum), cdt)
    if impl == "xla":
      o, final = xla.titans_memory_chunked(
          heads_major(q).astype(cdt), heads_major(k).astype(cdt), heads_major(v).astype(cdt),
          theta, log_keep, log_eta, weights, moments, chunk_size=min(chunk, t))
    else:
      backend = dispatch.pallas_backend(platform)
      t_pad = padding.round_up(t, chunk)
      pad = lambda a: padding.pad_axis(a, 2, t_pad)
      config = _Config(backend=backend, chunk_size=chunk, seq_len=t,
                       interpret=(impl == "interpret"))
      # Padded tokens: lr 0 and log gates 0; the kernels take the final state at token t-1.
      inputs = (pad(heads_major(q)), pad(heads_major(k)), pad(heads_major(v)), pad(theta),
                pad(log_keep), pad(log_eta))
      if depth == 2:
        o, (w1, w2, s1, s2) = _mlp_core(*inputs, *weights, *moments, config)
        final = ((w1, w2), (s1, s2))
      else:
        o, (m, s) = _linear_core(*inputs, weights[0], moments[0], config)
        final = ((m,), (s,))
      o = o[:, :, :t]
    o = jnp.moveaxis(o, 1, 2).astype(q.dtype)
  if not return_final_state:
    return o
  weights, moments = final
  return o, ((weights, moments) if is_tuple else (weights[0], moments[0]))
