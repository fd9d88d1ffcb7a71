"""Lightning attention layer (MiniMax-01 / TransNormerLLM): gated linear attention with a
fixed per-head decay, on the ``lightning_attention`` kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.decoding import check_cache_shape, check_decode_arguments
from layers.partitioning import logical_axes_metadata, shard_kernel, with_logical_axes
from pallas_kernels.lightning_attention import lightning_attention

# Logical axes of the kernel's operands: split over batch and heads. The state [B, H, Dk, Dv]
# travels as [B, Dk, H, Dv] so that one spec fits the output and the state alike.
_TOKENS_AXES = ("batch", None, "heads", None)
_DECAY_AXES = ("heads",)
_HIGHEST = jax.lax.Precision.HIGHEST


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The ALiBi head slopes of Press et al. (2022), "Train Short, Test Long", float64 [H].

  For a power of two n: 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise the slopes of the
  closest smaller power of two p, then every other slope of 2p (the reference ALiBi code).
  MiniMax-01's lightning attention and TransNormerLLM build their decay rates from exactly
  these slopes (``_build_slope_tensor`` in both reference implementations).
  """
  if not _is_int(num_heads) or num_heads < 1:
    raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}.")

  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if num_heads & (num_heads - 1) == 0:
    return np.asarray(power_of_two(num_heads))
  closest = 2 ** int(math.floor(math.log2(num_heads)))
  extra = power_of_two(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(power_of_two(closest) + extra)


def minimax_slope_scale(layer_index: int, num_layers: int) -> float:
  """MiniMax-01's per-layer factor on the slopes: ``1 - layer_index / (num_layers - 1)
  + 1e-5`` (1 in the first layer, nearly 0, i.e. almost no decay, in the last)."""
  if num_layers < 2:
    return 1.0
  return 1.0 - layer_index / (num_layers - 1) + 1e-5


class LightningAttention(nnx.Module):
  """Lightning attention: linear attention with a per-head exponential decay, normalised
  and gated output (the lightning attention layer of MiniMax-01, arXiv:2501.08313, after
  TransNormerLLM, arXiv:2307.14995).

  Per call, for x [batch, seq, features]:

    q, k, v = silu(x W_q), silu(x W_k), silu(x W_v)             [batch, seq, heads, head_dim]
    o       = lightning_attention(q, k, v, decay=λ)             S_t = λ_h S_{t-1} + k_t^T v_t,
                                                                o_t = q_t S_t
    o       = RMSNorm_head(o) * g                               per head (a group norm)
    y       = (sigmoid(x W_g) ⊙ o) W_o

  The decay of head h is λ_h = exp(-slope_scale * s_h) with s_h the ALiBi slopes
  (:func:`alibi_slopes`; MiniMax-01 and TransNormerLLM use these, scaled per layer by
  :func:`minimax_slope_scale`, which ``slope_scale`` takes, e.g. through
  ``DecoderLM.layer_options``). λ is a constant, not a parameter, as in both papers. No
  1/sqrt(d) scaling of q: the output normalisation removes the scale. MiniMax-01
  normalises over all heads jointly; here each head's output is RMS-normalised on its own
  (TransNormerLLM's and RetNet's group norm), with a learnable [heads, head_dim] scale g.

  Logical axes: q, k, v and gate kernels ("embed", "heads", "head_dim"), out kernel
  ("heads", "head_dim", "embed"), norm scale ("heads", "head_dim").

  Recurrent state: [batch, heads, head_dim, head_dim] float32 (the kernel's S). Processing a
  sequence in pieces, each starting from the state the previous one returned, equals one
  pass; with ``segment_ids`` the state restarts at every segment start (a given state
  reaches the first segment only).

  Args:
    features: model dimension of the input and output.
    num_heads: number of heads.
    head_dim: size of each head (d_k = d_v); default ``features // num_heads``.
    slope_scale: factor on the ALiBi slopes (> 0); 1 is the first layer of MiniMax-01.
    chunk_size: the kernel's chunk (None: its per-platform default).
    implementation: passed to the kernel: None, "pallas", "interpret", "xla", "reference".
    norm_eps: epsilon of the output RMSNorm.
    dtype: computation dtype of the projections (and the kernel's inputs); None promotes.
    param_dtype: dtype of the parameters.
    rngs: randomness for the kernel initialisers (LeCun normal).
  """

  def __init__(self, features: int, num_heads: int, *, head_dim: int | None = None,
               slope_scale: float = 1.0, chunk_size: int | None = None,
               implementation: str | None = None, norm_eps: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, value in (("features", features), ("num_heads", num_heads)):
      if not _is_int(value) or value <= 0:
        raise ValueError(f"LightningAttention: {name} must be a positive int, got {value!r}.")
    if head_dim is None:
      if features % num_heads:
        raise ValueError(
            f"LightningAttention: features={features} is not divisible by "
            f"num_heads={num_heads}; pass head_dim explicitly.")
      head_dim = features // num_heads
    if not _is_int(head_dim) or head_dim <= 0:
      raise ValueError(f"LightningAttention: head_dim must be a positive int, got {head_dim!r}.")
    if isinstance(slope_scale, bool) or not isinstance(slope_scale, (int, float)) or not (
        slope_scale > 0 and math.isfinite(slope_scale)):
      raise ValueError(
          f"LightningAttention: slope_scale must be a positive finite number (the factor on "
          f"the ALiBi slopes), got {slope_scale!r}.")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size <= 0):
      raise ValueError(
          f"LightningAttention: chunk_size must be a positive int or None, got {chunk_size!r}.")
    self.features = features
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.slope_scale = float(slope_scale)
    self.chunk_size = chunk_size
    self.implementation = implementation
    self.norm_eps = norm_eps
    # A constant of the layer (a tuple of Python floats: static, hashable), never trained.
    self.decay = tuple(float(d) for d in np.exp(-self.slope_scale * alibi_slopes(num_heads)))

    def projection(in_features, out_features, axis, logical_axes):
      kernel_init = with_logical_axes(nnx.initializers.lecun_normal(), logical_axes)
      return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=False,
                               kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    heads = (num_heads, head_dim)
    self.q_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.k_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.v_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.gate_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.o_proj = projection(heads, features, (-2, -1), ("heads", "head_dim", "embed"))
    # A norm scale (2-D only because it is per head): exempt from weight decay. The decay
    # λ is a constant of the layer, not a parameter.
    self.norm_scale = nnx.Param(jnp.ones(heads, param_dtype),
                                **logical_axes_metadata(("heads", "head_dim"),
                                                        weight_decay=False))

  def init_state(self, batch_size: int) -> jax.Array:
    """The zero state: float32 [batch_size, num_heads, head_dim, head_dim]."""
    return jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), jnp.float32)

  def init_cache(self, batch_size: int, max_length: int) -> jax.Array:
    """The decode cache: the zero state of :meth:`init_state`, float32 [batch_size,
    num_heads, head_dim, head_dim]. ``max_length`` is ignored (constant memory)."""
    del max_length
    return self.init_state(batch_size)

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None, state: jax.Array | None = None,
               return_state: bool = False, cache: jax.Array | None = None,
               num_new_tokens: jax.Array | None = None):
    """x: [batch, seq, features] -> [batch, seq, features] (and the new state when
    ``return_state``). ``position_ids`` is ignored (a recurrence); ``segment_ids`` int
    [batch, seq] or None; ``state`` [batch, heads, head_dim, head_dim] or None (zeros).

    Decoding: with a ``cache`` (from :meth:`init_cache`), x holds seq >= 1 new tokens after
    what the cache holds and the call returns ``(y, new_cache)``. ``num_new_tokens`` None
    (all tokens valid) or int [batch]: row b's valid tokens are x[b, :num_new_tokens[b]], the
    rest is right padding that leaves the cache untouched (its outputs are meaningless).
    One token (seq == 1) takes a closed-form step; more (a prefill) take the kernel from the
    cache's state, and with ``num_new_tokens`` the new state is formed in closed form,
    S_n = λ^n S_0 + Σ_{t<n} λ^(n-1-t) k_tᵀ v_t per row.
    """
    del position_ids
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(
          f"LightningAttention: x must be [batch, seq, {self.features}], got shape {x.shape}.")
    if segment_ids is not None and segment_ids.shape != x.shape[:2]:
      raise ValueError(f"LightningAttention: segment_ids must be [batch, seq] = {x.shape[:2]}, "
                       f"got shape {segment_ids.shape}.")
    want = (x.shape[0], self.num_heads, self.head_dim, self.head_dim)
    n_new = check_decode_arguments("LightningAttention", x, cache=cache, state=state,
                                   return_state=return_state, segment_ids=segment_ids,
                                   num_new_tokens=num_new_tokens)
    if cache is not None:
      check_cache_shape("LightningAttention", cache, want, "[batch, heads, head_dim, head_dim]")
      state = cache
    if state is not None and tuple(state.shape) != want:
      raise ValueError(f"LightningAttention: state must have shape {want} [batch, heads, "
                       f"head_dim, head_dim], got {tuple(state.shape)}.")
    q = jax.nn.silu(self.q_proj(x))
    k = jax.nn.silu(self.k_proj(x))
    v = jax.nn.silu(self.v_proj(x))
    compute = jnp.promote_types(jnp.float64 if q.dtype == jnp.float64 else jnp.float32,
                                jnp.float32 if state is None else state.dtype)

    if cache is not None and x.shape[1] == 1:
      # One token in closed form: S = λ S + kᵀ v, o = q S.
      lam = jnp.asarray(self.decay, compute)[None, :, None, None]
      q1, k1, v1 = (a[:, 0].astype(compute) for a in (q, k, v))  # [B, H, D]
      final = lam * cache.astype(compute) + k1[..., :, None] * v1[..., None, :]
      out = jnp.einsum("bhk,bhkv->bhv", q1, final, precision=_HIGHEST)[:, None]
      out = out.astype(q.dtype)
    else:
      def kernel(q, k, v, decay, state, segment_ids):
        if state is not None:
          state = jnp.swapaxes(state, 1, 2)
        out, final = lightning_attention(
            q, k, v, decay=decay, initial_state=state, return_final_state=True,
            segment_ids=segment_ids, chunk_size=self.chunk_size,
            implementation=self.implementation)
        return out, jnp.swapaxes(final, 1, 2)

      # Per shard of batch and heads under a sharded jit (the kernel is one custom call).
      carried = None if state is None else jnp.swapaxes(state, 1, 2)  # [B, Dk, H, Dv]
      out, final = shard_kernel(
          kernel, (q, k, v, jnp.asarray(self.decay, jnp.float32), carried, segment_ids),
          in_axes=(_TOKENS_AXES, _TOKENS_AXES, _TOKENS_AXES, _DECAY_AXES,
                   None if state is None else _TOKENS_AXES,
                   None if segment_ids is None else ("batch", None)),
          out_axes=_TOKENS_AXES)
      final = jnp.swapaxes(final, 1, 2)
      if n_new is not None:
        # Padding would decay the state in the kernel: the state after each row's n valid
        # tokens in closed form instead (the valid tokens' outputs are causal, unaffected).
        final = self._state_after(cache, k, v, n_new, compute)
    out32 = out.astype(jnp.float32)
    out32 = out32 * jax.lax.rsqrt(jnp.mean(jnp.square(out32), axis=-1, keepdims=True) +
                                  self.norm_eps)
    out = (out32 * self.norm_scale[...].astype(jnp.float32)).astype(q.dtype)
    out = jax.nn.sigmoid(self.gate_proj(x)) * out
    y = self.o_proj(out)
    if cache is not None:
      if n_new is not None:  # Rows without new tokens keep their cache exactly.
        final = jnp.where((n_new == 0)[:, None, None, None], cache.astype(final.dtype), final)
      return y, final
    if return_state:
      return y, final
    return y

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the chunked linear attention beyond the projections (2
    per multiply-add; decays, norm and gate not counted), chunk C = min(chunk_size or 64,
    seq_len), per head of dimension D: intra-chunk q.k and its product with v over the
    (C + 1) / 2 earlier positions of the chunk on average, 2 D (C + 1); the state's read
    q S and update kᵀ v, 2 D² each. Returned as ``{"recurrent": ...}``."""
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"LightningAttention.core_flops_per_token: seq_len must be a positive "
                       f"int, got {seq_len!r}.")
    chunk, d = min(self.chunk_size or 64, int(seq_len)), self.head_dim
    return {"recurrent": float(self.num_heads * (2 * d * (chunk + 1) + 4 * d * d))}

  def _state_after(self, state, k, v, n_new, compute):
    """S_n = λ^n S_0 + Σ_{t<n} λ^(n-1-t) k_tᵀ v_t per row (n = n_new[b]), in ``compute``.

    state [B, H, Dk, Dv]; k, v [B, T, H, D]; n_new int32 [B]."""
    seq = k.shape[1]
    log_lam = jnp.log(jnp.asarray(self.decay, compute))  # [H]
    t = jnp.arange(seq)[None, :]
    age = jnp.maximum(n_new[:, None] - 1 - t, 0).astype(compute)  # [B, T]
    weights = jnp.where((t < n_new[:, None])[..., None], jnp.exp(age[..., None] * log_lam),
                        0.0)  # [B, T, H]
    carried = jnp.exp(n_new.astype(compute)[:, None] * log_lam)  # [B, H]
    added = jnp.einsum("bth,bthk,bthv->bhkv", weights, k.astype(compute), v.astype(compute),
                       precision=_HIGHEST)
    return carried[..., None, None] * state.astype(compute) + added