"""The Mamba (Mamba-1) block: gated selective state-space mixer with a short causal conv.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), and
the reference implementation ``mamba_ssm.modules.mamba_simple.Mamba`` (state-spaces/mamba),
whose initialisation this layer follows (read for reference, not copied).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.decoding import check_decode_arguments, last_valid
from layers.initializers import torch_linear_init
from layers.norms import RMSNorm
from layers.partitioning import shard_kernel, with_logical_axes
from pallas_kernels._common import dispatch
from pallas_kernels.selective_scan import selective_scan

# Logical axes of the scan's operands (channels are independent: split them like the weights).
_TOKENS_AXES = ("batch", None, "ssm_inner")
_BC_AXES = ("batch", None, None)
_CHANNEL_AXES = ("ssm_inner",)
_A_AXES = ("ssm_inner", None)
_STATE_AXES = ("batch", "ssm_inner", None)


class MambaState(NamedTuple):
  """What a Mamba layer carries from one piece of a sequence to the next.

  conv: [batch, d_conv - 1, d_inner], the last d_conv - 1 inputs of the convolution (oldest
    first; zeros before the start of the sequence).
  ssm: [batch, d_inner, d_state], the selective-scan state.
  Both float32 (float64 when the layer computes in float64).
  """
  conv: jax.Array
  ssm: jax.Array


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_positive_int(name, value):
  if not _is_int(value) or value < 1:
    raise ValueError(f"Mamba: option {name} must be a positive int, got {value!r}.")


def inverse_softplus(x):
  """The y with softplus(y) = x (x > 0): x + log(-expm1(-x))."""
  return x + jnp.log(-jnp.expm1(-x))


def _symmetric_uniform(bound):
  """Initializer: uniform in [-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


def _segment_runs(segment_ids, batch, seq):
  """int32 [batch, seq]: how many segment starts precede each token (0 in the first
  segment, which continues the carried state)."""
  if segment_ids is None:
    return jnp.zeros((batch, seq), jnp.int32)
  changed = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(changed, axis=1)],
                         axis=1)


class Mamba(nnx.Module):
  """Mamba-1 mixer: ``out_proj(S6(silu(conv(x_in))) * silu(z))`` with [x_in, z] = in_proj(x).

  Per token (features -> features):

    x_in, z = in_proj(x)                       2 x d_inner (bias if use_bias)
    x_c = silu(causal depthwise conv1d(x_in))  d_conv taps per channel (bias if use_conv_bias)
    dt_low, B, C = x_proj(x_c)                 dt_rank, d_state, d_state (no bias)
    dt_low, B, C = rms(dt_low), rms(B), rms(C) only with dt_bc_norm (Jamba's dt/b/c_layernorm)
    delta = dt_proj(dt_low)                    d_inner; its bias is the scan's delta_bias
    y = selective_scan(x_c, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    out = out_proj(y)                          d_inner -> features (bias if use_bias)

  with A = -exp(A_log) [d_inner, d_state]. Initialisation as Mamba's reference code:
  A_log = log(1 ... d_state) in every channel (S4D-real, A = -(1 ... d_state)); D = 1;
  dt_proj's bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (floored at
  ``dt_init_floor``) and its kernel uniform in +-dt_rank^-0.5 * dt_scale ("random" dt init);
  the conv kernel and bias uniform in +-d_conv^-0.5 (PyTorch's Conv1d default); in_proj,
  x_proj and out_proj U(+-1/sqrt(fan_in)) (PyTorch's nn.Linear default, which the reference
  keeps for them; ``layers.initializers.torch_linear_init``, as Mamba2's). (The reference
  model's optional rescaling of out_proj by 1 / sqrt(n_layer) is left to the model.) A_log,
  D and dt_bias are kept in float32 whatever ``param_dtype``, as the reference keeps them
  (and Mamba2 does).

  Segments: at a token whose segment id differs from the previous token's, the conv sees no
  earlier token and the scan restarts from zero, so packed rows equal separate runs. A
  carried ``state`` continues the first segment of the piece only.

  Logical axes: in_proj ("embed", None, "ssm_inner") (x and z halves), conv kernel
  ("conv_width", "ssm_inner"), conv bias, dt bias and D ("ssm_inner",), x_proj
  ("ssm_inner", None), dt_proj (None, "ssm_inner"), A_log ("ssm_inner", "ssm_state"),
  out_proj ("ssm_inner", "embed"); with use_bias in_proj_bias (None, "ssm_inner") and
  out_proj_bias ("embed",); with dt_bc_norm the scales of dt_norm, B_norm, C_norm (None,).

  Args:
    features: model dimension.
    expand: d_inner = expand * features.
    d_state: state size N per channel.
    d_conv: taps of the causal conv (tap k weighs the token k steps back).
    dt_rank: rank of the dt projection; "auto" is ceil(features / 16).
    dt_min, dt_max: range of the initial dt; dt_init_floor: its floor; dt_scale: scale of
      dt_proj's kernel initialisation.
    use_bias: biases on in_proj ([2, d_inner]) and out_proj ([features]), zero-initialised
      (Hugging Face ``MambaConfig.use_bias``; the reference has none).
    use_conv_bias: a bias on the convolution ([d_inner]; the reference's default).
    dt_bc_norm: RMS-normalise dt_low, B and C (each over its own last axis, learnable scale
      initialised to 1) right after x_proj, as Jamba's Mamba layers do.
    dt_bc_norm_eps: epsilon of those three norms.
    implementation, chunk_size: passed to :func:`pallas_kernels.selective_scan`.
    dtype: computation dtype (None: the input's); the scan's state stays float32.
    param_dtype: dtype of the projection and convolution parameters (A_log, D and dt_bias
      stay float32).
    rngs: randomness for the initialisers.
  """

  def __init__(self, features: int, *, expand: int = 2, d_state: int = 16, d_conv: int = 4,
               dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
               dt_init_floor: float = 1e-4, dt_scale: float = 1.0, use_bias: bool = False,
               use_conv_bias: bool = True, dt_bc_norm: bool = False,
               dt_bc_norm_eps: float = 1e-6, implementation: str | None = None,
               chunk_size: int | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    _check_positive_int("features", features)
    _check_positive_int("expand", expand)
    _check_positive_int("d_state", d_state)
    _check_positive_int("d_conv", d_conv)
    if dt_rank == "auto":
      dt_rank = math.ceil(features / 16)
    elif not _is_int(dt_rank) or dt_rank < 1:
      raise ValueError(f"Mamba: option dt_rank must be 'auto' or a positive int, got "
                       f"{dt_rank!r}.")
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max),
                        ("dt_init_floor", dt_init_floor), ("dt_scale", dt_scale)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          0 < value < math.inf):
        raise ValueError(f"Mamba: option {name} must be a positive number, got {value!r}.")
    if dt_min > dt_max:
      raise ValueError(f"Mamba: option dt_min ({dt_min}) must not exceed dt_max ({dt_max}).")
    for name, value in (("use_bias", use_bias), ("use_conv_bias", use_conv_bias),
                        ("dt_bc_norm", dt_bc_norm)):
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Mamba: option {name} must be a bool, got {value!r}.")
    if isinstance(dt_bc_norm_eps, bool) or not isinstance(dt_bc_norm_eps, (int, float)) or not (
        0 < dt_bc_norm_eps < math.inf):
      raise ValueError(f"Mamba: option dt_bc_norm_eps must be a positive number, got "
                       f"{dt_bc_norm_eps!r}.")
    if implementation not in dispatch.IMPLEMENTATIONS:
      raise ValueError(f"Mamba: option implementation must be one of "
                       f"{dispatch.IMPLEMENTATIONS}, got {implementation!r}.")
    if chunk_size is not None:
      _check_positive_int("chunk_size", chunk_size)

    self.features, self.expand, self.d_state, self.d_conv = features, expand, d_state, d_conv
    self.d_inner = d_inner = expand * features
    self.dt_rank = dt_rank
    self.implementation, self.chunk_size = implementation, chunk_size
    self.dtype = dtype

    def param(init, shape, axes, dtype=param_dtype, weight_decay=True):
      return nnx.Param(with_logical_axes(init, axes, weight_decay=weight_decay)(
          rngs.params(), shape, dtype))

    # [features, 2, d_inner]: fan_in = features, as the reference's Linear(features, 2 d_inner).
    self.in_proj = param(torch_linear_init(in_axis=0, out_axis=(1, 2)), (features, 2, d_inner),
                         ("embed", None, "ssm_inner"))
    conv_bound = d_conv ** -0.5
    self.conv_kernel = param(_symmetric_uniform(conv_bound), (d_conv, d_inner),
                             ("conv_width", "ssm_inner"))
    self.in_proj_bias = (param(nnx.initializers.zeros_init(), (2, d_inner), (None, "ssm_inner"))
                         if use_bias else None)
    self.conv_bias = (param(_symmetric_uniform(conv_bound), (d_inner,), ("ssm_inner",))
                      if use_conv_bias else None)
    self.x_proj = param(torch_linear_init(), (d_inner, dt_rank + 2 * d_state),
                        ("ssm_inner", None))
    self.dt_proj = param(_symmetric_uniform(dt_rank ** -0.5 * dt_scale), (dt_rank, d_inner),
                         (None, "ssm_inner"))

    def dt_bias_init(key, shape, dtype):
      log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
      dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
      return inverse_softplus(dt).astype(dtype)

    f32 = jnp.float32  # A_log, D and dt_bias: float32 whatever param_dtype (see above).
    # A_log, D and dt_bias are exempt from weight decay (as the reference's _no_weight_decay).
    self.dt_bias = param(dt_bias_init, (d_inner,), ("ssm_inner",), f32, weight_decay=False)

    def a_log_init(key, shape, dtype):
      del key
      return jnp.log(jnp.broadcast_to(jnp.arange(1, shape[1] + 1, dtype=jnp.float32),
                                      shape)).astype(dtype)

    self.A_log = param(a_log_init, (d_inner, d_state), ("ssm_inner", "ssm_state"), f32,
                       weight_decay=False)
    self.D = param(nnx.initializers.ones_init(), (d_inner,), ("ssm_inner",), f32,
                   weight_decay=False)
    self.out_proj = param(torch_linear_init(), (d_inner, features), ("ssm_inner", "embed"))
    self.out_proj_bias = (param(nnx.initializers.zeros_init(), (features,), ("embed",))
                          if use_bias else None)
    if dt_bc_norm:
      norm = lambda size: RMSNorm(size, eps=dt_bc_norm_eps, param_dtype=param_dtype,
                                  logical_axis=None)
      self.dt_norm, self.B_norm, self.C_norm = norm(dt_rank), norm(d_state), norm(d_state)
    else:
      self.dt_norm = self.B_norm = self.C_norm = None

  def init_state(self, batch_size: int) -> MambaState:
    """The zero state for ``batch_size`` rows (float32)."""
    return MambaState(conv=jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), jnp.float32),
                      ssm=jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32))

  def _conv(self, x, conv_state, runs, dtype):
    """Causal depthwise conv over [carried inputs; x]; returns (out, new conv state)."""
    b, seq, _ = x.shape
    k = self.d_conv
    ext = jnp.concatenate([conv_state.astype(dtype), x], axis=1)  # [b, k - 1 + seq, d]
    ext_runs = jnp.concatenate([jnp.zeros((b, k - 1), jnp.int32), runs], axis=1)
    kernel = self.conv_kernel[...].astype(dtype)
    out = x * kernel[0]
    if self.conv_bias is not None:
      out = out + self.conv_bias[...].astype(dtype)
    for lag in range(1, k):
      past = jax.lax.slice_in_dim(ext, k - 1 - lag, k - 1 - lag + seq, axis=1)
      past_runs = jax.lax.slice_in_dim(ext_runs, k - 1 - lag, k - 1 - lag + seq, axis=1)
      out = out + jnp.where((past_runs == runs)[..., None], past, 0) * kernel[lag]
    # The next piece continues the last segment: drop carried inputs of earlier segments.
    tail, tail_runs = ext[:, ext.shape[1] - (k - 1):], ext_runs[:, ext.shape[1] - (k - 1):]
    last_run = ext_runs[:, -1:]
    new_state = jnp.where((tail_runs == last_run)[..., None], tail, 0)
    return out, new_state.astype(jnp.promote_types(dtype, jnp.float32))

  def init_cache(self, batch_size: int, max_length: int) -> MambaState:
    """The decode cache: the zero :class:`MambaState` for ``batch_size`` rows (float32).

    ``max_length`` is ignored: the state has constant size whatever the length.
    """
    del max_length
    return self.init_state(batch_size)

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token (2 per multiply-add), the same at every ``seq_len``:

    * "matmul": in_proj, x_proj, dt_proj and out_proj, which this layer keeps as raw
      arrays (not ``nnx.Linear`` modules, so generic counters do not see them);
    * "recurrent": the selective scan, 9 d_inner d_state (discretisation, state update,
      read; Mamba's own count) + 2 d_inner (the D skip and the z gate);
    * "conv": the depthwise convolution, 2 d_conv d_inner.
    """
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"Mamba.core_flops_per_token: seq_len must be a positive int, got "
                       f"{seq_len!r}.")
    d, n, r, f = self.d_inner, self.d_state, self.dt_rank, self.features
    projections = f * 2 * d + d * (r + 2 * n) + r * d + d * f
    return {"matmul": 2.0 * projections, "recurrent": 9.0 * d * n + 2.0 * d,
            "conv": 2.0 * self.d_conv * d}

  def _check_state(self, state, batch: int, what: str) -> MambaState:
    """``state`` as a :class:`MambaState` after checking its shapes against ``batch``."""
    want = {"conv": (batch, self.d_conv - 1, self.d_inner),
            "ssm": (batch, self.d_inner, self.d_state)}
    if not isinstance(state, (tuple, list)) or len(state) != 2:
      raise ValueError(f"Mamba: {what} must be a MambaState(conv {want['conv']}, ssm "
                       f"{want['ssm']}), got {type(state).__name__}.")
    state = MambaState(*state)
    for name in ("conv", "ssm"):
      got = tuple(getattr(getattr(state, name), "shape", ()))
      if got != want[name]:
        raise ValueError(
            f"Mamba: {what}.{name} must have shape {want[name]} for a batch of {batch} rows, "
            f"got {got} (a {what} built for another batch size or another layer?).")
    return state

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None, state: MambaState | None = None,
               return_state: bool = False, cache: MambaState | None = None,
               num_new_tokens: jax.Array | None = None):
    """x [batch, seq, features] -> [batch, seq, features] (and the new state if asked).

    ``position_ids`` are ignored (a recurrence needs none). ``state`` None is the zero state.

    Decoding: with a ``cache`` (from :meth:`init_cache`), x holds seq >= 1 new tokens after
    what the cache holds and the call returns ``(y, new_cache)``. ``num_new_tokens`` None
    (all tokens valid) or int [batch]: row b's valid tokens are x[b, :num_new_tokens[b]], the
    rest is right padding that leaves the cache untouched (its outputs are meaningless).
    One token (seq == 1) takes a closed-form step; more (a prefill) take the selective scan
    from the cache's state, with dt = 0 (an exact no-op) at padded tokens.
    """
    del position_ids
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(f"Mamba: x must be [batch, seq, {self.features}], got shape {x.shape}.")
    b, seq, _ = x.shape
    if segment_ids is not None and segment_ids.shape != (b, seq):
      raise ValueError(f"Mamba: segment_ids must be [batch, seq] = {(b, seq)}, got shape "
                       f"{segment_ids.shape}.")
    n_new = check_decode_arguments("Mamba", x, cache=cache, state=state,
                                   return_state=return_state, segment_ids=segment_ids,
                                   num_new_tokens=num_new_tokens)
    if cache is not None:
      state = self._check_state(cache, b, "cache")
    elif state is None:
      state = self.init_state(b)
    else:
      state = self._check_state(state, b, "state")
    dtype = x.dtype if self.dtype is None else self.dtype
    x = x.astype(dtype)
    xz = jnp.einsum("btf,fkd->btkd", x, self.in_proj[...].astype(dtype))
    if self.in_proj_bias is not None:
      xz = xz + self.in_proj_bias[...].astype(dtype)
    x_in, z = xz[:, :, 0], xz[:, :, 1]
    runs = _segment_runs(segment_ids, b, seq)
    x_conv, conv_state = self._conv(x_in, state.conv, runs, dtype)
    if n_new is not None:
      # The last d_conv - 1 *valid* inputs: positions n .. n + d_conv - 2 of [state; x_in].
      conv_state = last_valid(jnp.concatenate([state.conv.astype(dtype), x_in], axis=1),
                               n_new, self.d_conv - 1).astype(conv_state.dtype)
    x_conv = jax.nn.silu(x_conv)
    x_dbl = x_conv @ self.x_proj[...].astype(dtype)
    r, n = self.dt_rank, self.d_state
    dt_low, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    if self.dt_norm is not None:
      dt_low, B, C = self.dt_norm(dt_low), self.B_norm(B), self.C_norm(C)
    delta = dt_low @ self.dt_proj[...].astype(dtype)
    # Parameters and the state enter the scan in float32 at least (float64 stays float64).
    f32 = lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32))
    A = -jnp.exp(f32(self.A_log[...]))
    D, dt_bias = f32(self.D[...]), f32(self.dt_bias[...])

    if cache is not None and seq == 1:
      y, ssm_state = self._step(x_conv[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0],
                                dt_bias, state.ssm)
      y = y[:, None].astype(dtype)
    else:
      softplus_in_scan = True
      if n_new is not None:
        # Padding must leave the state alone: dt = softplus(delta + bias) is formed here and
        # zeroed at padded tokens (exp(0 A) = 1, 0 B u = 0), and the scan adds no bias.
        valid = jnp.arange(seq)[None, :] < n_new[:, None]
        delta = jnp.where(valid[..., None], jax.nn.softplus(f32(delta) + dt_bias), 0.0)
        dt_bias, softplus_in_scan = None, False

      def scan(u, delta, A, B, C, D, z, dt_bias, ssm_state, segment_ids):
        y, final = selective_scan(
            u, delta, A, B, C, D, z, dt_bias, delta_softplus=softplus_in_scan,
            initial_state=ssm_state, return_final_state=True,
            implementation=self.implementation, segment_ids=segment_ids,
            chunk_size=self.chunk_size)
        # [b, n, d] so that one output spec, (batch, None, ssm_inner), fits both outputs.
        return y, jnp.swapaxes(final, 1, 2)

      y, ssm_state = shard_kernel(
          scan, (x_conv, delta, A, B, C, D, z, dt_bias, f32(state.ssm), segment_ids),
          in_axes=(_TOKENS_AXES, _TOKENS_AXES, _A_AXES, _BC_AXES, _BC_AXES, _CHANNEL_AXES,
                   _TOKENS_AXES, None if dt_bias is None else _CHANNEL_AXES, _STATE_AXES,
                   None if segment_ids is None else ("batch", None)),
          out_axes=_TOKENS_AXES)
      ssm_state = jnp.swapaxes(ssm_state, 1, 2)
    out = y @ self.out_proj[...].astype(dtype)
    if self.out_proj_bias is not None:
      out = out + self.out_proj_bias[...].astype(dtype)
    if cache is not None:
      new = MambaState(conv=conv_state, ssm=ssm_state)
      if n_new is not None:  # Rows without new tokens keep their cache exactly.
        keep = n_new == 0
        new = jax.tree.map(
            lambda new_v, old_v: jnp.where(keep[:, None, None], old_v.astype(new_v.dtype),
                                           new_v), new, state)
      return out, new
    if not return_state:
      return out
    return out, MambaState(conv=conv_state, ssm=ssm_state)

  def _step(self, u, delta, A, B, C, D, z, dt_bias, ssm):
    """One token of the S6 recurrence in closed form (no scan kernel).

    u, delta, z [batch, d_inner]; B, C [batch, d_state]; ssm [batch, d_inner, d_state].
    Returns y [batch, d_inner] and the new state, in float32 (float64 for float64 inputs).
    """
    cdt = jnp.promote_types(jnp.promote_types(u.dtype, jnp.float32), ssm.dtype)
    u, delta, z, B, C = (v.astype(cdt) for v in (u, delta, z, B, C))
    dt = jax.nn.softplus(delta + dt_bias.astype(cdt))  # [b, d]
    h = (jnp.exp(dt[..., None] * A.astype(cdt)) * ssm.astype(cdt)
         + (dt * u)[..., None] * B[:, None, :])
    y = jnp.sum(h * C[:, None, :], axis=-1) + D.astype(cdt) * u
    return y * jax.nn.silu(z), h