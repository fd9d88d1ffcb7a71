"""The Mamba-2 mixer block: in-projection, short causal convolution, SSD, gated RMSNorm.

After Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (ICML 2024), and the block and initialisation of the
reference implementation (``mamba_ssm.modules.mamba2.Mamba2``; read, not copied).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.decoding import check_decode_arguments, last_valid
from layers.initializers import torch_linear_init
from layers.partitioning import logical_axes_metadata, shard_kernel, with_logical_axes
from pallas_kernels._common import dispatch
from pallas_kernels.ssd import ssd

# Logical axes of the SSD operands under ``shard_kernel``: split over the batch only.
_BATCH4 = ("batch", None, None, None)
_BATCH3 = ("batch", None, None)
_BATCH2 = ("batch", None)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _torch_linear_init(axes):
  """PyTorch's nn.Linear default (``layers.initializers.torch_linear_init``), which the
  reference keeps for these weights, with logical axes."""
  return with_logical_axes(torch_linear_init(), axes)


class Mamba2(nnx.Module):
  """Mamba-2 block: x [batch, seq, features] -> [batch, seq, features].

  ::

      z, xBC, dt = in_proj(x)          z: d_inner, xBC: d_inner + 2 * n_groups * d_state,
                                       dt: heads (d_inner = expand * features,
                                       heads = d_inner / head_dim)
      xBC = silu(conv1d(xBC))          causal depthwise convolution, d_conv taps
      x, B, C = split(xBC)             x [.., heads, head_dim], B, C [.., n_groups, d_state]
      y = ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)   A = -exp(A_log)
      y = rmsnorm(y * silu(z))         gated RMSNorm (norm after the gate), per group of
                                       d_inner / n_groups channels
      out = out_proj(y)

  Initialisation as the reference: in_proj, out_proj, conv weights and conv bias
  U(+-1/sqrt(fan_in)) (PyTorch's default); dt_bias = softplus^-1(dt) with
  dt = exp(U(log dt_min, log dt_max)) floored at dt_init_floor; A_log = log(U(A_init_range));
  D = 1; norm scale 1. (The reference's optional rescaling of out_proj by 1 / sqrt(n_layer)
  is left to the model.) A_log, D and dt_bias are kept in float32 whatever param_dtype, as
  the reference keeps them.

  State (for processing a sequence in pieces, :meth:`init_state`): a pair
  (conv state [batch, d_conv - 1, conv_channels], the last inputs of the convolution;
  ssm state [batch, heads, head_dim, d_state]), float32. A given state continues the row's
  first segment; a new segment (segment id change) starts from zeros in the convolution and
  the SSM. Conv-state entries of tokens outside the row's last segment are stored as zeros,
  so the returned state carries only that segment.

  Logical axes: in_proj ("embed", "ssm_in_proj"); conv kernel ("conv_width",
  "ssm_conv_channels"), conv bias ("ssm_conv_channels",); A_log, D, dt_bias ("ssm_heads",);
  norm scale ("ssm_inner",); out_proj ("ssm_inner", "embed"); with use_bias the in_proj bias
  ("ssm_in_proj",) and the out_proj bias ("embed",).

  Args:
    features: model width.
    expand: d_inner = expand * features.
    head_dim: channels per SSM head (d_inner must be a multiple).
    d_state: SSM state size N.
    n_groups: groups of B/C shared by heads / n_groups heads each (heads a multiple).
    d_conv: taps of the causal depthwise convolution (>= 1).
    chunk_size: SSD chunk length; None takes the backend default.
    dt_min, dt_max, dt_init_floor: the range of the initial step sizes.
    A_init_range: (low, high) with 0 < low <= high: A = -U(low, high) at initialisation.
    norm_eps: epsilon of the gated RMSNorm.
    use_bias: biases on in_proj and out_proj, zero-initialised (Hugging Face
      ``Mamba2Config.use_bias``; the reference's default has none).
    use_conv_bias: a bias on the convolution (the reference's default).
    implementation: SSD implementation (None, "pallas", "interpret", "xla", "reference").
    dtype: computation dtype; None keeps the input dtype.
    param_dtype: dtype of the projection and convolution parameters.
    rngs: randomness for the initialisers.
  """

  def __init__(self, features: int, *, expand: int = 2, head_dim: int = 64, d_state: int = 64,
               n_groups: int = 1, d_conv: int = 4, chunk_size: int | None = None,
               dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
               A_init_range: tuple[float, float] = (1.0, 16.0), norm_eps: float = 1e-5,
               use_bias: bool = False, use_conv_bias: bool = True,
               implementation: str | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    for name, value in (("features", features), ("expand", expand), ("head_dim", head_dim),
                        ("d_state", d_state), ("n_groups", n_groups), ("d_conv", d_conv)):
      if not _is_int(value) or value <= 0:
        raise ValueError(f"Mamba2: {name} must be a positive int, got {value!r}.")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size <= 0):
      raise ValueError(f"Mamba2: chunk_size must be a positive int or None, got {chunk_size!r}.")
    d_inner = expand * features
    if d_inner % head_dim:
      raise ValueError(f"Mamba2: d_inner = expand * features = {d_inner} must be a multiple of "
                       f"head_dim={head_dim}.")
    heads = d_inner // head_dim
    if heads % n_groups:
      raise ValueError(f"Mamba2: heads = d_inner / head_dim = {heads} must be a multiple of "
                       f"n_groups={n_groups}.")
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor),
                        ("norm_eps", norm_eps)):
      if not _is_number(value) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"Mamba2: {name} must be a positive number, got {value!r}.")
    if dt_min > dt_max:
      raise ValueError(f"Mamba2: dt_min ({dt_min}) must not exceed dt_max ({dt_max}).")
    if (not isinstance(A_init_range, (tuple, list)) or len(A_init_range) != 2
        or not all(_is_number(v) for v in A_init_range)
        or not 0 < A_init_range[0] <= A_init_range[1]):
      raise ValueError(f"Mamba2: A_init_range must be (low, high) with 0 < low <= high, got "
                       f"{A_init_range!r}.")
    for name, value in (("use_bias", use_bias), ("use_conv_bias", use_conv_bias)):
      if not isinstance(value, bool):
        raise ValueError(f"Mamba2: {name} must be a bool, got {value!r}.")
    if implementation not in dispatch.IMPLEMENTATIONS:
      raise ValueError(f"Mamba2: implementation must be one of {dispatch.IMPLEMENTATIONS}, "
                       f"got {implementation!r}.")

    self.features, self.d_inner, self.heads = features, d_inner, heads
    self.head_dim, self.d_state, self.n_groups, self.d_conv = head_dim, d_state, n_groups, d_conv
    self.conv_channels = d_inner + 2 * n_groups * d_state
    self.chunk_size, self.norm_eps, self.implementation = chunk_size, norm_eps, implementation
    self.dtype = dtype

    self.in_proj = nnx.Linear(
        features, 2 * d_inner + 2 * n_groups * d_state + heads, use_bias=use_bias,
        kernel_init=_torch_linear_init(("embed", "ssm_in_proj")),
        bias_init=with_logical_axes(nnx.initializers.zeros_init(), ("ssm_in_proj",)),
        dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    bound = 1.0 / math.sqrt(d_conv)
    uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
    self.conv_kernel = nnx.Param(
        uniform(rngs.params(), (d_conv, self.conv_channels), param_dtype),
        **logical_axes_metadata(("conv_width", "ssm_conv_channels")))
    self.conv_bias = (nnx.Param(uniform(rngs.params(), (self.conv_channels,), param_dtype),
                                **logical_axes_metadata(("ssm_conv_channels",)))
                      if use_conv_bias else None)
    # dt = exp(U(log dt_min, log dt_max)), floored; dt_bias = softplus^-1(dt).
    u = jax.random.uniform(rngs.params(), (heads,), jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_init_floor)
    # dt_bias, A_log and D are exempt from weight decay (as the reference's _no_weight_decay).
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)),
                             **logical_axes_metadata(("ssm_heads",), weight_decay=False))
    a = jax.random.uniform(rngs.params(), (heads,), jnp.float32, A_init_range[0],
                           A_init_range[1])
    self.A_log = nnx.Param(jnp.log(a), **logical_axes_metadata(("ssm_heads",),
                                                               weight_decay=False))
    self.D = nnx.Param(jnp.ones((heads,), jnp.float32),
                       **logical_axes_metadata(("ssm_heads",), weight_decay=False))
    self.norm_scale = nnx.Param(jnp.ones((d_inner,), param_dtype),
                                **logical_axes_metadata(("ssm_inner",)))
    self.out_proj = nnx.Linear(
        d_inner, features, use_bias=use_bias,
        kernel_init=_torch_linear_init(("ssm_inner", "embed")),
        bias_init=with_logical_axes(nnx.initializers.zeros_init(), ("embed",)),
        dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def init_state(self, batch_size: int):
    """The zero state: (conv [batch, d_conv - 1, conv_channels], ssm [batch, heads,
    head_dim, d_state]), float32."""
    return (jnp.zeros((batch_size, self.d_conv - 1, self.conv_channels), jnp.float32),
            jnp.zeros((batch_size, self.heads, self.head_dim, self.d_state), jnp.float32))

  def init_cache(self, batch_size: int, max_length: int):
    """The decode cache: the zero state of :meth:`init_state` (float32). ``max_length`` is
    ignored: the state has constant size whatever the length."""
    del max_length
    return self.init_state(batch_size)

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token beyond in_proj / out_proj, at ``seq_len`` (2 per
    multiply-add; gates, norm and decays not counted), with chunk L = min(chunk_size or 64,
    seq_len), G groups, H heads of P channels, N states:

    * "recurrent", the chunked SSD: intra-chunk C Bᵀ (per group) and its product with x
      over the (L + 1) / 2 earlier positions of the chunk on average, (G N + H P)(L + 1);
      chunk states (Bᵀ x) and their read (C h), 2 H P N each;
    * "conv": the depthwise convolution, 2 d_conv (d_inner + 2 G N).
    """
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"Mamba2.core_flops_per_token: seq_len must be a positive int, got "
                       f"{seq_len!r}.")
    chunk = min(self.chunk_size or 64, seq_len)
    gn, hp = self.n_groups * self.d_state, self.heads * self.head_dim
    scan = (gn + hp) * (chunk + 1) + 4 * hp * self.d_state
    return {"recurrent": float(scan), "conv": 2.0 * self.d_conv * self.conv_channels}

  def _check_state(self, state, batch, what="state"):
    expected = jax.tree.map(lambda a: a.shape, self.init_state(batch))
    if (not isinstance(state, (tuple, list)) or len(state) != 2
        or tuple(tuple(getattr(s, "shape", ())) for s in state) != expected):
      got = (tuple(tuple(getattr(s, "shape", ())) for s in state)
             if isinstance(state, (tuple, list)) else type(state).__name__)
      raise ValueError(f"Mamba2: {what} must be (conv {expected[0]}, ssm {expected[1]}) as "
                       f"init_state({batch}) gives for a batch of {batch} rows, got {got} (a "
                       f"{what} built for another batch size or another layer?).")

  def _conv(self, xbc, conv_state, runs, dtype):
    """Causal depthwise convolution over [conv state, xbc] with segment resets.

    Tap k weighs the input k steps back; it is dropped where that input lies in another
    run of segment ids (state entries belong to run 0, the row's first segment). Returns
    silu(conv) and the new conv state.
    """
    seq = xbc.shape[1]
    width = self.d_conv - 1
    ext = jnp.concatenate([conv_state.astype(dtype), xbc], axis=1)  # [b, width + seq, ch]
    kernel = self.conv_kernel[...].astype(dtype)
    ext_runs = None
    if runs is not None:
      ext_runs = jnp.concatenate([jnp.zeros((runs.shape[0], width), runs.dtype), runs], axis=1)
    out = xbc * kernel[0]
    for lag in range(1, self.d_conv):
      past = ext[:, width - lag:width - lag + seq]
      if runs is not None:
        same = ext_runs[:, width - lag:width - lag + seq] == runs
        past = jnp.where(same[..., None], past, 0)
      out = out + past * kernel[lag]
    if self.conv_bias is not None:
      out = out + self.conv_bias[...].astype(dtype)
    new_state = ext[:, ext.shape[1] - width:]
    if runs is not None and width:
      last_run = ext_runs[:, -1:]
      new_state = jnp.where((ext_runs[:, ext.shape[1] - width:] == last_run)[..., None],
                            new_state, 0)
    return jax.nn.silu(out), new_state.astype(jnp.float32)

  def _gated_norm(self, y, z):
    """RMSNorm of y * silu(z) over groups of d_inner / n_groups channels (float32)."""
    y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    shape = y.shape
    y = y.reshape(*shape[:-1], self.n_groups, self.d_inner // self.n_groups)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.norm_eps)
    return y.reshape(shape) * self.norm_scale[...].astype(jnp.float32)

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None, state=None, return_state: bool = False,
               cache=None, num_new_tokens: jax.Array | None = None):
    """x [batch, seq, features] -> y [batch, seq, features] (and the new state if asked).

    position_ids are ignored (a recurrence). segment_ids int [batch, seq] or None: packed
    rows; the convolution and the scan restart at every change of id. ``state`` None means
    the zero state.

    Decoding: with a ``cache`` (from :meth:`init_cache`), x holds seq >= 1 new tokens after
    what the cache holds and the call returns ``(y, new_cache)``. ``num_new_tokens`` None
    (all tokens valid) or int [batch]: row b's valid tokens are x[b, :num_new_tokens[b]], the
    rest is right padding that leaves the cache untouched (its outputs are meaningless).
    One token (seq == 1) takes a closed-form step; more (a prefill) take the SSD kernel from
    the cache's state, with dt = 0 (an exact no-op) at padded tokens.
    """
    del position_ids
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(f"Mamba2: x must be [batch, seq, {self.features}], got shape {x.shape}.")
    batch, seq = x.shape[:2]
    if segment_ids is not None and segment_ids.shape != (batch, seq):
      raise ValueError(f"Mamba2: segment_ids must be [batch, seq] = {(batch, seq)}, got shape "
                       f"{segment_ids.shape}.")
    n_new = check_decode_arguments("Mamba2", x, cache=cache, state=state,
                                   return_state=return_state, segment_ids=segment_ids,
                                   num_new_tokens=num_new_tokens)
    if cache is not None:
      self._check_state(cache, batch, "cache")
      state = tuple(cache)
    elif state is None:
      state = self.init_state(batch)
    else:
      self._check_state(state, batch)
    conv_state, ssm_state = state
    old_state = state
    dtype = x.dtype if self.dtype is None else self.dtype
    zxbcdt = self.in_proj(x.astype(dtype))
    d_inner, gn = self.d_inner, self.n_groups * self.d_state
    z = zxbcdt[..., :d_inner]
    xbc = zxbcdt[..., d_inner:d_inner + self.conv_channels]
    dt = zxbcdt[..., d_inner + self.conv_channels:]
    runs = None
    if segment_ids is not None:
      change = jnp.concatenate([jnp.zeros((batch, min(seq, 1)), jnp.int32),
                                (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)],
                               axis=1)
      runs = jnp.cumsum(change, axis=1)
    if n_new is not None:
      # The last d_conv - 1 *valid* inputs: positions n .. n + d_conv - 2 of [state; xbc].
      last_inputs = last_valid(jnp.concatenate([conv_state.astype(dtype), xbc], axis=1),
                                n_new, self.d_conv - 1).astype(jnp.float32)
    xbc, conv_state = self._conv(xbc, conv_state, runs, dtype)
    if n_new is not None:
      conv_state = last_inputs
    xs = xbc[..., :d_inner].reshape(batch, seq, self.heads, self.head_dim)
    B = xbc[..., d_inner:d_inner + gn].reshape(batch, seq, self.n_groups, self.d_state)
    C = xbc[..., d_inner + gn:].reshape(batch, seq, self.n_groups, self.d_state)
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    dt_bias = self.dt_bias[...]

    if cache is not None and seq == 1:
      y, ssm_state = self._step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state)
      y = y[:, None]
    else:
      softplus_in_scan = True
      if n_new is not None:
        # Padding must leave the state alone: dt' = softplus(dt + bias) is formed here and
        # zeroed at padded tokens (exp(0 A) = 1, 0 x B = 0), and the kernel adds no bias.
        cdt = jnp.float64 if xs.dtype == jnp.float64 else jnp.float32
        valid = jnp.arange(seq)[None, :] < n_new[:, None]
        dt = jnp.where(valid[..., None],
                       jax.nn.softplus(dt.astype(cdt) + dt_bias.astype(cdt)), 0.0)
        dt_bias, softplus_in_scan = None, False

      def scan(xs, dt, A, B, C, D, dt_bias, ssm_state, segment_ids):
        return ssd(xs, dt, A, B, C, chunk_size=self.chunk_size, D=D, dt_bias=dt_bias,
                   dt_softplus=softplus_in_scan, initial_states=ssm_state,
                   return_final_states=True, implementation=self.implementation,
                   segment_ids=segment_ids)

      y, ssm_state = shard_kernel(
          scan, (xs, dt, A, B, C, self.D[...], dt_bias, ssm_state, segment_ids),
          in_axes=(_BATCH4, _BATCH3, None, _BATCH4, _BATCH4, None, None, _BATCH4,
                   None if segment_ids is None else _BATCH2),
          out_axes=_BATCH4)
    y = self._gated_norm(y.reshape(batch, seq, d_inner), z).astype(dtype)
    out = self.out_proj(y)
    if cache is not None:
      new = (conv_state, ssm_state)
      if n_new is not None:  # Rows without new tokens keep their cache exactly.
        keep = n_new == 0
        new = tuple(jnp.where(keep.reshape((batch,) + (1,) * (v.ndim - 1)),
                              old.astype(v.dtype), v) for v, old in zip(new, old_state))
      return out, new
    return (out, (conv_state, ssm_state)) if return_state else out

  def _step(self, xs, dt, A, B, C, ssm):
    """One token of the SSD recurrence in closed form (no kernel).

    xs [batch, heads, head_dim], dt [batch, heads] (before bias and softplus), B, C
    [batch, n_groups, d_state], ssm [batch, heads, head_dim, d_state]. Returns y + D x
    [batch, heads, head_dim] and the new state, float32 (float64 for float64 inputs).
    """
    cdt = jnp.promote_types(jnp.float64 if xs.dtype == jnp.float64 else jnp.float32,
                            ssm.dtype)
    rep = self.heads // self.n_groups
    xs, B, C = xs.astype(cdt), B.astype(cdt), C.astype(cdt)
    Bh, Ch = jnp.repeat(B, rep, axis=1), jnp.repeat(C, rep, axis=1)  # [b, heads, n]
    dt = jax.nn.softplus(dt.astype(cdt) + self.dt_bias[...].astype(cdt))  # [b, heads]
    decay = jnp.exp(dt * A.astype(cdt))[..., None, None]
    h = decay * ssm.astype(cdt) + (dt[..., None] * xs)[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", h, Ch, precision=jax.lax.Precision.HIGHEST)
    return y + self.D[...].astype(cdt)[:, None] * xs, h