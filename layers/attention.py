"""Multi-head self-attention (MHA, GQA, MQA) on the flash-attention kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.norms import RMSNorm
from layers.partitioning import shard_kernel, with_logical_axes
from layers.rope import apply_rope, rope_frequencies
from pallas_kernels import flash_attention


# Logical axes of the kernel's operands. Query heads take the key/value heads' name: a split
# of the kv heads into contiguous blocks carries exactly the query heads of their groups.
_QUERY_AXES = ("batch", None, "kv_heads", None)
_KV_AXES = ("batch", None, "kv_heads", None)


class Attention(nnx.Module):
  """Self-attention with grouped key/value heads, optional QK-norm and RoPE.

  ``num_kv_heads == num_heads`` is multi-head attention, ``1`` is multi-query attention and
  anything in between that divides ``num_heads`` is grouped-query attention: query head
  ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``.

  Per call: bias-free projections q [features -> num_heads x head_dim] and k, v
  [features -> num_kv_heads x head_dim]; with ``use_qk_norm`` an :class:`RMSNorm` over
  head_dim (one scale shared by all heads) on q and on k; RoPE on q and k unless
  ``rope_theta`` is None (NoPE); :func:`pallas_kernels.flash_attention` with scale
  ``head_dim ** -0.5``; the output projection [num_heads x head_dim -> features].

  Logical axes of the kernels: q ("embed", "heads", "head_dim"), k and v ("embed",
  "kv_heads", "head_dim"), o ("heads", "head_dim", "embed"); QK-norm scales ("head_dim",).

  Args:
    features: model dimension of the input and output.
    num_heads: number of query heads.
    num_kv_heads: number of key/value heads; default ``num_heads``.
    head_dim: size of each head; default ``features // num_heads``.
    use_qk_norm: RMS-normalise each query and key head vector before RoPE.
    rope_theta: RoPE base (rotate-half layout), or None for no position encoding.
    is_causal: each token attends only to itself and earlier tokens.
    logits_soft_cap: if set, logits -> cap * tanh(logits / cap).
    implementation: passed to the kernel: None, "pallas", "interpret", "xla", "reference".
    dtype: computation dtype of the projections; None promotes inputs and parameters.
    param_dtype: dtype of the parameters.
    rngs: randomness for the kernel initialisers.
  """

  def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, use_qk_norm: bool = False,
               rope_theta: float | None = 10000.0, is_causal: bool = True,
               logits_soft_cap: float | None = None, implementation: str | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0:
      raise ValueError(
          f"Attention: num_heads and num_kv_heads must be positive, got num_heads={num_heads} "
          f"and num_kv_heads={num_kv_heads}."
      )
    if num_heads % num_kv_heads:
      raise ValueError(
          f"Attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}."
      )
    if head_dim is None:
      if features % num_heads:
        raise ValueError(
            f"Attention: features={features} is not divisible by num_heads={num_heads}; "
            "pass head_dim explicitly."
        )
      head_dim = features // num_heads
    if head_dim <= 0:
      raise ValueError(f"Attention: head_dim must be positive, got {head_dim}.")
    if rope_theta is not None and head_dim % 2:
      raise ValueError(f"Attention: RoPE needs an even head_dim, got head_dim={head_dim}.")

    self.features = features
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.is_causal = is_causal
    self.logits_soft_cap = logits_soft_cap
    self.implementation = implementation

    def projection(in_features, out_features, axis, logical_axes):
      kernel_init = with_logical_axes(nnx.initializers.lecun_normal(), logical_axes)
      return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=False,
                               kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    self.q_proj = projection(features, (num_heads, head_dim), -1,
                             ("embed", "heads", "head_dim"))
    self.k_proj = projection(features, (num_kv_heads, head_dim), -1,
                             ("embed", "kv_heads", "head_dim"))
    self.v_proj = projection(features, (num_kv_heads, head_dim), -1,
                             ("embed", "kv_heads", "head_dim"))
    self.o_proj = projection((num_heads, head_dim), features, (-2, -1),
                             ("heads", "head_dim", "embed"))
    if use_qk_norm:
      self.q_norm = RMSNorm(head_dim, param_dtype=param_dtype, logical_axis="head_dim")
      self.k_norm = RMSNorm(head_dim, param_dtype=param_dtype, logical_axis="head_dim")
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Attends over the sequence of ``x``.

    Args:
      x: [batch, seq, features].
      position_ids: integer [batch, seq] (or [1, seq]) RoPE positions; default 0 .. seq - 1
        for every row. Packed sequences usually restart them at each segment. Unused
        without RoPE.
      segment_ids: integer [batch, seq]; tokens attend only within their segment.

    Returns:
      [batch, seq, features].
    """
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(
          f"Attention: x must be [batch, seq, {self.features}], got shape {x.shape}."
      )
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope_theta is not None:
      if position_ids is None:
        position_ids = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
      inv_freq = rope_frequencies(self.head_dim, self.rope_theta)
      q = apply_rope(q, position_ids, inv_freq)
      k = apply_rope(k, position_ids, inv_freq)
    def attend(q, k, v, segment_ids):
      return flash_attention(
          q, k, v, scale=None, is_causal=self.is_causal, segment_ids=segment_ids,
          logits_soft_cap=self.logits_soft_cap, implementation=self.implementation)

    # Per shard of batch and heads under a sharded jit (the kernel is one custom call). The
    # sequence stays whole: splitting it needs ring attention, not a plain shard_map.
    out = shard_kernel(
        attend, (q, k, v, segment_ids),
        in_axes=(_QUERY_AXES, _KV_AXES, _KV_AXES, None if segment_ids is None else ("batch", None)),
        out_axes=_QUERY_AXES)
    return self.o_proj(out)
