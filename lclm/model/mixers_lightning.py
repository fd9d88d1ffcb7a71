"""The "lightning" mixer: lightning attention (MiniMax-01 / TransNormerLLM), a linear
recurrence with a per-head decay, on the ``lightning_attention`` kernel.

Importing this module registers the name; then e.g.
``DecoderLM(..., layer_pattern=["lightning", "attention"],
mixer_options={"lightning": {"num_heads": 4}, "attention": {"num_heads": 4}})``.
"""

from __future__ import annotations

from flax import nnx

from layers.lightning import LightningAttention
from lclm.model.registry import register_mixer


@register_mixer("lightning")
def lightning(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
              num_heads: int | None = None, head_dim: int | None = None,
              slope_scale: float = 1.0, chunk_size: int | None = None,
              implementation: str | None = None) -> LightningAttention:
  """:class:`layers.lightning.LightningAttention`: q, k, v with SiLU, decay λ_h =
  exp(-slope_scale * ALiBi slope_h), per-head RMSNorm of the output, sigmoid output gate.

  ``num_heads`` is required; ``head_dim`` defaults to features // num_heads. MiniMax-01
  scales the slopes per layer (``layers.lightning.minimax_slope_scale``): set
  ``slope_scale`` per layer with ``DecoderLM.layer_options``. The layer exposes its state
  (``init_state``, ``state=`` / ``return_state=``): [batch, heads, head_dim, head_dim], and
  a decode cache of the same shape (``init_cache(batch, max_length)``, ``cache=``,
  ``num_new_tokens=``; constant memory, a closed-form one-token step).
  """
  if num_heads is None:
    raise ValueError("mixer 'lightning' needs the option num_heads, e.g. "
                     "mixer_options={'lightning': {'num_heads': 4}}.")
  return LightningAttention(features, num_heads, head_dim=head_dim, slope_scale=slope_scale,
                            chunk_size=chunk_size, implementation=implementation, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
