"""The "mamba" mixer: the Mamba-1 block (:class:`layers.mamba.Mamba`), registered by name.

Import this module to make "mamba" available to ``DecoderLM.layer_pattern``.
"""

from __future__ import annotations

from flax import nnx

from layers.mamba import Mamba
from lclm.model.registry import register_mixer


@register_mixer("mamba")
def mamba(features: int, *, rngs: nnx.Rngs, dtype, param_dtype, expand: int = 2,
          d_state: int = 16, d_conv: int = 4, dt_rank: int | str = "auto",
          dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
          dt_scale: float = 1.0, use_bias: bool = False, use_conv_bias: bool = True,
          dt_bc_norm: bool = False, dt_bc_norm_eps: float = 1e-6,
          implementation: str | None = None, chunk_size: int | None = None) -> Mamba:
  """Mamba-1 mixer (Gu & Dao 2023): in-projection to x and z (expand * features each),
  causal depthwise conv (d_conv taps) + SiLU, selective scan (d_state states per channel,
  dt of rank dt_rank, "auto" = ceil(features / 16), initialised log-uniform in
  [dt_min, dt_max]), SiLU(z) gating, out-projection. ``use_bias`` adds biases to the in- and
  out-projections, ``use_conv_bias`` (default True) one to the convolution, ``dt_bc_norm``
  RMSNorms (eps ``dt_bc_norm_eps``) on dt, B and C after x_proj (Jamba's Mamba layers).
  Options are validated by the layer; ``implementation`` and ``chunk_size`` go to the
  selective-scan kernel. The module carries a state (``init_state``, ``state=`` /
  ``return_state=``) and a decode cache (``init_cache(batch, max_length)``: the state;
  ``cache=``, ``num_new_tokens=``; constant memory, a closed-form one-token step)."""
  return Mamba(features, expand=expand, d_state=d_state, d_conv=d_conv, dt_rank=dt_rank,
               dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, dt_scale=dt_scale,
               use_bias=use_bias, use_conv_bias=use_conv_bias, dt_bc_norm=dt_bc_norm,
               dt_bc_norm_eps=dt_bc_norm_eps, implementation=implementation,
               chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
