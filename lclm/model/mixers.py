"""The built-in sequence mixers, registered by name."""

from __future__ import annotations

from flax import nnx

from layers import Attention
from lclm.model.registry import register_mixer


@register_mixer("attention")
def attention(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
              num_heads: int | None = None, num_kv_heads: int | None = None,
              head_dim: int | None = None, use_qk_norm: bool = False,
              rope_theta: float | None = 10000.0, logits_soft_cap: float | None = None,
              implementation: str | None = None) -> Attention:
  """Causal self-attention (:class:`layers.Attention`); ``rope_theta=None`` is NoPE.

  ``num_heads`` is required; the other options default as in the layer.
  """
  if num_heads is None:
    raise ValueError(
        "mixer 'attention' needs the option num_heads, e.g. "
        "mixer_options={'attention': {'num_heads': 4}}."
    )
  return Attention(features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   use_qk_norm=use_qk_norm, rope_theta=rope_theta, is_causal=True,
                   logits_soft_cap=logits_soft_cap, implementation=implementation,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
