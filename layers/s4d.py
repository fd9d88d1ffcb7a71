"""S4D: the diagonal state-space layer of Gu, Gupta, Goel and Ré (2022), "On the
Parameterization and Initialization of Diagonal State Space Models" (arXiv:2206.11893),
after the standalone S4D layer of the state-spaces/s4 reference code.

No Pallas kernel: the layer is a per-channel convolution (FFT, O(L log L)) or a diagonal
complex recurrence (an associative scan), both of which XLA runs well on every platform.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.decoding import check_cache_shape, check_decode_arguments
from layers.partitioning import with_logical_axes

INITS = ("lin", "inv")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def s4d_imag_init(init: str, state_size: int) -> np.ndarray:
  """Imaginary parts of A [state_size // 2] (the real parts all start at -1/2).

  S4D-Lin: A_n = -1/2 + i π n.  S4D-Inv: A_n = -1/2 + i N/π (N/(2n+1) - 1), N = state_size.
  """
  n = np.arange(state_size // 2, dtype=np.float64)
  if init == "lin":
    return math.pi * n
  if init == "inv":
    return state_size / math.pi * (state_size / (2 * n + 1) - 1)
  raise ValueError(f"S4D: init must be one of {INITS}, got {init!r}.")


def _complex(pair):
  """[..., 2] float (real, imag) -> complex."""
  return jax.lax.complex(pair[..., 0], pair[..., 1])


def _pair(z):
  """complex -> [..., 2] float (real, imag)."""
  return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)


def _complex_dtype(dtype):
  return jnp.complex128 if dtype == jnp.float64 else jnp.complex64


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)  # torch.nn.GELU(), as the reference layer


def _scan_with_resets(decay, inputs, resets, initial=None):
  """h_t = decay ⊙ h_{t-1} ⊙ (1 - reset_t) + inputs_t along axis 1, by an associative scan.

  decay [H, N] (or per token, [B, L, H, N]) complex; inputs [B, L, H, N] complex; resets
  bool [B, L] or None; initial [B, H, N] or None (the state before token 0; a reset at token
  0 drops it).
  """
  coeff = jnp.broadcast_to(decay, inputs.shape)
  if resets is not None:
    coeff = jnp.where(resets[:, :, None, None], 0.0, coeff).astype(inputs.dtype)
  if initial is not None:
    inputs = inputs.at[:, 0].add(coeff[:, 0] * initial)

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, states = jax.lax.associative_scan(combine, (coeff, inputs), axis=1)
  return states


class S4D(nnx.Module):
  """Diagonal state-space layer (S4D) with a GELU and a gated output linear.

  Each of the ``features`` channels (d_model, no input projection: the channels are the
  model features) is a single-input single-output SSM with ``state_size // 2`` complex
  states, discretised by zero-order hold with its own step Δ:

    Ā = exp(Δ A),   B̄ = (exp(Δ A) - 1) / A · B
    h_t = Ā h_{t-1} + B̄ u_t,   y_t = 2 Re(C h_t) + D u_t

  (the factor 2 and the real part: the conjugate half of the spectrum is implied). Then
  y = GLU(W gelu(y) + b), with W mapping features -> 2 x features (the reference layer's
  ``Conv1d(H, 2H, 1)`` + ``GLU``).

  Parameters (as the reference ``S4DKernel``): A = -exp(log_A_real) + i A_imag with
  log_A_real = log(1/2) and A_imag from ``init`` ("lin": S4D-Lin, "inv": S4D-Inv, see
  :func:`s4d_imag_init`); log Δ uniform in [log dt_min, log dt_max] per channel; B = 1
  (complex); C standard complex normal (variance 1/2 per part); D standard normal. Complex
  parameters are stored as float pairs [..., 2] (real, imag). All are trained.

  Two computations of the same map:
  * the training path (no state asked, no segments): the kernel K_l = 2 Re(Σ_n C_n B̄_n
    Ā_n^l), l < L, by a Vandermonde product, applied by an FFT convolution, O(L log L);
  * the state path (a ``state`` given, ``return_state``, or ``segment_ids``): the
    recurrence, as an associative scan over the sequence. With ``segment_ids`` the state
    restarts from zero at every token whose segment id differs from the previous token's,
    so packed sequences never mix (the convolution cannot cut at segment starts; this is
    the fallback). Its memory is O(batch x seq x features x state_size / 2).

  State: float32 [batch, features, state_size // 2, 2], the complex h as (real, imag) pairs
  (float64 for float64 inputs). Processing a sequence in pieces, each starting from the
  state the previous returned, equals one pass.

  ``bidirectional`` (Long Range Arena-style, non-causal): a second kernel with its own C
  runs backwards over the sequence (keys after the token, lags >= 1), as the reference's
  bidirectional mode; there is no state then (asking for one raises), and segments are
  honoured in both directions.

  Logical axes: log_dt, D ("ssm_inner",); log_A_real, A_imag ("ssm_inner", "ssm_state");
  B, C ("ssm_inner", "ssm_state", None); output kernel ("ssm_inner", None, "embed") and bias
  (None, "embed").

  Args:
    features: model dimension = number of SSM channels.
    state_size: N, the state size; each channel has N / 2 complex states (even, >= 2).
    init: "lin" (S4D-Lin) or "inv" (S4D-Inv).
    dt_min, dt_max: range of the log-uniform initial step Δ (0 < dt_min <= dt_max).
    bidirectional: non-causal (no state).
    dtype: computation dtype of the output linear; None promotes. The SSM itself runs in
      float32 (complex64), float64 inputs in float64.
    param_dtype: dtype of the parameters.
    rngs: randomness for the initialisers.
  """

  def __init__(self, features: int, *, state_size: int = 64, init: str = "lin",
               dt_min: float = 0.001, dt_max: float = 0.1, bidirectional: bool = False,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not _is_int(features) or features <= 0:
      raise ValueError(f"S4D: features must be a positive int, got {features!r}.")
    if not _is_int(state_size) or state_size < 2 or state_size % 2:
      raise ValueError(f"S4D: state_size must be an even int >= 2 (N / 2 complex states per "
                       f"channel), got {state_size!r}.")
    if init not in INITS:
      raise ValueError(f"S4D: init must be one of {INITS} (S4D-Lin, S4D-Inv), got {init!r}.")
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          0 < value < math.inf):
        raise ValueError(f"S4D: {name} must be a positive finite number, got {value!r}.")
    if dt_min > dt_max:
      raise ValueError(f"S4D: dt_min={dt_min} must not exceed dt_max={dt_max}.")
    if not isinstance(bidirectional, bool):
      raise ValueError(f"S4D: bidirectional must be a bool, got {bidirectional!r}.")
    self.features = features
    self.state_size = state_size
    self.init = init
    self.bidirectional = bidirectional
    self.dtype = dtype
    h, n = features, state_size // 2

    def param(init_fn, shape, axes, weight_decay=True):
      return nnx.Param(with_logical_axes(init_fn, axes, weight_decay=weight_decay)(
          rngs.params(), shape, param_dtype))

    def log_dt_init(key, shape, dtype):
      lo, hi = math.log(dt_min), math.log(dt_max)
      return jax.random.uniform(key, shape, dtype, lo, hi)

    def constant(value):
      return lambda key, shape, dtype: jnp.broadcast_to(jnp.asarray(value, dtype), shape)

    def complex_normal(key, shape, dtype):  # torch.randn(cfloat): variance 1/2 per part
      return jax.random.normal(key, shape, dtype) * math.sqrt(0.5)

    # The discretisation (log Δ, A, B) and the skip D are exempt from weight decay (the
    # reference trains log Δ and A with weight_decay 0): decay would pull A to -1 + 0i and
    # Δ to 1, whatever the data. C, the read-out, is a weight like any projection.
    self.log_dt = param(log_dt_init, (h,), ("ssm_inner",), weight_decay=False)
    self.log_A_real = param(constant(math.log(0.5)), (h, n), ("ssm_inner", "ssm_state"),
                            weight_decay=False)
    self.A_imag = param(constant(s4d_imag_init(init, state_size)), (h, n),
                        ("ssm_inner", "ssm_state"), weight_decay=False)
    self.B = param(constant(np.array([1.0, 0.0])), (h, n, 2), ("ssm_inner", "ssm_state", None),
                   weight_decay=False)
    channels = 2 if bidirectional else 1
    self.C = param(complex_normal, (channels, h, n, 2), (None, "ssm_inner", "ssm_state", None))
    self.D = param(jax.nn.initializers.normal(1.0), (h,), ("ssm_inner",), weight_decay=False)
    self.out_proj = nnx.LinearGeneral(
        h, (2, h), use_bias=True, dtype=dtype, param_dtype=param_dtype,
        kernel_init=with_logical_axes(nnx.initializers.lecun_normal(), ("ssm_inner", None,
                                                                        "embed")),
        bias_init=with_logical_axes(nnx.initializers.zeros_init(), (None, "embed")),
        rngs=rngs)

  # ----------------------------------------------------------------------------- SSM

  def _discretised(self, real_dtype):
    """(Δ A [H, N], B̄ [H, N], C [channels, H, N]), complex (Ā = exp(Δ A))."""
    cdtype = _complex_dtype(real_dtype)
    dt = jnp.exp(self.log_dt[...].astype(real_dtype))
    a = jax.lax.complex(-jnp.exp(self.log_A_real[...].astype(real_dtype)),
                        self.A_imag[...].astype(real_dtype))
    dt_a = dt[:, None].astype(cdtype) * a
    b_bar = (jnp.exp(dt_a) - 1.0) / a * _complex(self.B[...].astype(real_dtype))
    return dt_a, b_bar, _complex(self.C[...].astype(real_dtype))

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the SSM beyond the output linear, counted on the
    recurrence whatever path runs (FFT convolution or scan), the same at every
    ``seq_len``: per channel and complex state, 8 for h = Ā h + B̄ u (a complex
    multiply-add) and 4 for the read 2 Re(C h); 2 per channel for D u; twice the state
    work when bidirectional. Returned as ``{"recurrent": ...}``."""
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"S4D.core_flops_per_token: seq_len must be a positive int, got "
                       f"{seq_len!r}.")
    directions = 2 if self.bidirectional else 1
    states = self.features * (self.state_size // 2)
    return {"recurrent": float(directions * 12 * states + 2 * self.features)}

  def kernel(self, length: int, real_dtype=jnp.float32) -> jax.Array:
    """The convolution kernels [channels, H, length]: K_l = 2 Re(Σ_n C_n B̄_n Ā_n^l), by a
    Vandermonde product (powers Ā^l = exp(l Δ A), never by repeated products)."""
    dt_a, b_bar, c = self._discretised(real_dtype)
    vandermonde = jnp.exp(dt_a[..., None] * jnp.arange(length, dtype=real_dtype))  # [H, N, L]
    return 2.0 * jnp.real(jnp.einsum("chn,hnl->chl", c * b_bar, vandermonde))

  def _convolve(self, u):
    """The training path: u [B, L, H] (real) -> SSM output without D, by FFT."""
    length = u.shape[1]
    k = self.kernel(length, u.dtype)  # [channels, H, L]
    n = 2 * length
    u_f = jnp.fft.rfft(u, n=n, axis=1)  # [B, n/2+1, H]
    y = jnp.fft.irfft(u_f * jnp.fft.rfft(k[0].T, n=n, axis=0), n=n, axis=1)[:, :length]
    if self.bidirectional:
      # Keys after the token: lag -(j + 1) weighs K1[j] (circular positions n - 1 - j).
      backward = jnp.zeros((n, self.features), u.dtype).at[n - length:].set(k[1][:, ::-1].T)
      y = y + jnp.fft.irfft(u_f * jnp.fft.rfft(backward, axis=0), n=n, axis=1)[:, :length]
    return y

  def _recur(self, u, segment_ids, initial, valid=None):
    """The state path: u [B, L, H] -> (SSM output without D, final state [B, H, N] complex).

    ``valid`` bool [B, L] or None: invalid tokens are no-ops on the state (decay 1, input 0),
    so the final state is the state after the row's last valid token."""
    dt_a, b_bar, c = self._discretised(u.dtype)
    a_bar = jnp.exp(dt_a)
    inputs = u.astype(a_bar.dtype)[..., None] * b_bar  # [B, L, H, N]
    resets = None
    if segment_ids is not None:
      resets = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                                segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    decay = a_bar
    if valid is not None:
      mask = valid[:, :, None, None]
      decay = jnp.where(mask, a_bar, jnp.ones((), a_bar.dtype))
      inputs = jnp.where(mask, inputs, jnp.zeros((), inputs.dtype))
    states = _scan_with_resets(decay, inputs, resets, initial)
    y = 2.0 * jnp.real(jnp.einsum("hn,blhn->blh", c[0], states))
    if self.bidirectional:
      # Backward states g_t = Σ_{s >= t, same run} Ā^(s-t) B̄ u_s; the token reads g_{t+1}
      # when token t + 1 is in its run.
      rev_resets = None if resets is None else jnp.concatenate(
          [resets[:, 1:], jnp.zeros_like(resets[:, :1])], axis=1)[:, ::-1]
      g = _scan_with_resets(a_bar, inputs[:, ::-1], rev_resets)[:, ::-1]
      g_next = jnp.pad(g[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))
      if resets is not None:
        keep = jnp.concatenate([~resets[:, 1:], jnp.zeros_like(resets[:, :1])], axis=1)
        g_next = jnp.where(keep[:, :, None, None], g_next, 0.0)
      y = y + 2.0 * jnp.real(jnp.einsum("hn,blhn->blh", c[1], g_next))
    return y, states[:, -1]

  # ----------------------------------------------------------------------------- API

  def init_state(self, batch_size: int) -> jax.Array:
    """The zero state: float32 [batch_size, features, state_size // 2, 2] (real, imag)."""
    if self.bidirectional:
      raise ValueError("S4D: a bidirectional layer has no recurrent state (it reads the "
                       "whole sequence); use bidirectional=False to carry state.")
    return jnp.zeros((batch_size, self.features, self.state_size // 2, 2), jnp.float32)

  def init_cache(self, batch_size: int, max_length: int) -> jax.Array:
    """The decode cache: the zero state of :meth:`init_state` (float32). ``max_length`` is
    ignored (constant memory). A bidirectional layer has none (ValueError)."""
    del max_length
    if self.bidirectional:
      raise ValueError("S4D: a bidirectional layer has no decode cache (it reads the whole "
                       "sequence, no causal state); use bidirectional=False to decode.")
    return self.init_state(batch_size)

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None, state: jax.Array | None = None,
               return_state: bool = False, cache: jax.Array | None = None,
               num_new_tokens: jax.Array | None = None):
    """x: [batch, seq, features] -> [batch, seq, features] (and the new state when
    ``return_state``). ``position_ids`` is ignored; ``segment_ids`` int [batch, seq] or None;
    ``state`` [batch, features, state_size // 2, 2] or None (zeros).

    Decoding: with a ``cache`` (from :meth:`init_cache`), x holds seq >= 1 new tokens after
    what the cache holds and the call returns ``(y, new_cache)``. ``num_new_tokens`` None
    (all tokens valid) or int [batch]: row b's valid tokens are x[b, :num_new_tokens[b]], the
    rest is right padding that leaves the cache untouched (its outputs are meaningless).
    One token (seq == 1) takes a closed-form step h = Ā h + B̄ u; more (a prefill) take the
    associative scan from the cache's state, with decay 1 and input 0 at padded tokens.
    """
    del position_ids
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(f"S4D: x must be [batch, seq, {self.features}], got shape {x.shape}.")
    if segment_ids is not None and segment_ids.shape != x.shape[:2]:
      raise ValueError(f"S4D: segment_ids must be [batch, seq] = {x.shape[:2]}, got shape "
                       f"{segment_ids.shape}.")
    want = (x.shape[0], self.features, self.state_size // 2, 2)
    if cache is not None and self.bidirectional:
      raise ValueError("S4D: a bidirectional layer has no decode cache (it reads the whole "
                       "sequence, no causal state); use bidirectional=False to decode.")
    n_new = check_decode_arguments("S4D", x, cache=cache, state=state,
                                   return_state=return_state, segment_ids=segment_ids,
                                   num_new_tokens=num_new_tokens)
    if cache is not None:
      check_cache_shape("S4D", cache, want, "[batch, features, state_size // 2, (real, imag)]")
      state = cache
    if self.bidirectional and (state is not None or return_state):
      raise ValueError("S4D: a bidirectional layer has no recurrent state: it reads the "
                       "whole sequence, so neither state nor return_state=True can be used "
                       "(set bidirectional=False for a causal, stateful layer).")
    if state is not None and tuple(state.shape) != want:
      raise ValueError(f"S4D: state must have shape {want} [batch, features, state_size // 2, "
                       f"(real, imag)], got {tuple(state.shape)}.")
    real = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    u = x.astype(real)
    final = None
    if x.shape[1] == 0:
      y = u
      final = None if state is None else _complex(state.astype(real))
    elif cache is not None and x.shape[1] == 1:
      # One token in closed form: h = Ā h + B̄ u, output 2 Re(C h) (D u added below).
      dt_a, b_bar, c = self._discretised(real)
      final = jnp.exp(dt_a) * _complex(state.astype(real)) + u[:, 0, :, None] * b_bar
      y = (2.0 * jnp.real(jnp.einsum("hn,bhn->bh", c[0], final)))[:, None]
    elif state is None and not return_state and segment_ids is None:
      y = self._convolve(u)
    else:
      initial = None if state is None else _complex(state.astype(real))
      valid = None if n_new is None else jnp.arange(x.shape[1])[None, :] < n_new[:, None]
      y, final = self._recur(u, segment_ids, initial, valid)
    y = y + u * self.D[...].astype(real)
    dtype = x.dtype if self.dtype is None else self.dtype
    z = self.out_proj(_gelu(y).astype(dtype))
    out = z[..., 0, :] * jax.nn.sigmoid(z[..., 1, :])
    if cache is not None:
      new = _pair(final).astype(real)
      if n_new is not None:  # Rows without new tokens keep their cache exactly.
        new = jnp.where((n_new == 0)[:, None, None, None], cache.astype(real), new)
      return out, new
    if not return_state:
      return out
    if final is None:
      final = jnp.zeros(want[:3], _complex_dtype(real))
    return out, _pair(final).astype(real)