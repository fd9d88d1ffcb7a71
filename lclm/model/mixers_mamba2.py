"""The "mamba2" mixer: Mamba-2's block (:class:`layers.mamba2.Mamba2`), registered by name.

Import this module to make the name available to ``DecoderLM``'s ``layer_pattern``, e.g.
``layer_pattern=["mamba2", "attention"]`` with ``mixer_options={"mamba2": {"head_dim": 16,
"d_state": 16}}``.
"""

from __future__ import annotations

from flax import nnx

from layers.mamba2 import Mamba2
from lclm.model.registry import register_mixer
from pallas_kernels._common import dispatch


def _positive_int(name, value, allow_none=False):
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"mixer 'mamba2': option {name} must be a positive int"
                     f"{' or None' if allow_none else ''}, got {value!r}.")


def _positive_number(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"mixer 'mamba2': option {name} must be a positive number, got {value!r}.")


@register_mixer("mamba2")
def mamba2(features: int, *, rngs: nnx.Rngs, dtype, param_dtype, expand: int = 2,
           head_dim: int = 64, d_state: int = 64, n_groups: int = 1, d_conv: int = 4,
           chunk_size: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1,
           dt_init_floor: float = 1e-4, norm_eps: float = 1e-5, use_bias: bool = False,
           use_conv_bias: bool = True, implementation: str | None = None) -> Mamba2:
  """Mamba-2 block (in_proj -> causal depthwise conv + SiLU -> SSD -> gated RMSNorm ->
  out_proj); the options are those of :class:`layers.mamba2.Mamba2` (``norm_eps``: the gated
  RMSNorm's epsilon; ``use_bias``: biases on in_proj and out_proj; ``use_conv_bias``: a bias on
  the convolution).

  d_inner = expand * features must be a multiple of head_dim, and the heads
  (d_inner / head_dim) a multiple of n_groups. The module exposes ``init_state(batch)`` and
  ``__call__(x, position_ids=..., segment_ids=..., state=None, return_state=False)``, and a
  decode cache (``init_cache(batch, max_length)``: the state; ``cache=``,
  ``num_new_tokens=``; constant memory, a closed-form one-token step).
  """
  for name, value in (("expand", expand), ("head_dim", head_dim), ("d_state", d_state),
                      ("n_groups", n_groups), ("d_conv", d_conv)):
    _positive_int(name, value)
  _positive_int("chunk_size", chunk_size, allow_none=True)
  for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor),
                      ("norm_eps", norm_eps)):
    _positive_number(name, value)
  if dt_min > dt_max:
    raise ValueError(f"mixer 'mamba2': option dt_min ({dt_min}) must not exceed dt_max "
                     f"({dt_max}).")
  if implementation not in dispatch.IMPLEMENTATIONS:
    raise ValueError(f"mixer 'mamba2': option implementation must be one of "
                     f"{dispatch.IMPLEMENTATIONS}, got {implementation!r}.")
  d_inner = expand * features
  if d_inner % head_dim:
    raise ValueError(f"mixer 'mamba2': option head_dim={head_dim} must divide d_inner = "
                     f"expand * features = {expand} * {features} = {d_inner}.")
  if (d_inner // head_dim) % n_groups:
    raise ValueError(f"mixer 'mamba2': option n_groups={n_groups} must divide the number of "
                     f"heads d_inner / head_dim = {d_inner // head_dim}.")
  return Mamba2(features, expand=expand, head_dim=head_dim, d_state=d_state,
                n_groups=n_groups, d_conv=d_conv, chunk_size=chunk_size, dt_min=dt_min,
                dt_max=dt_max, dt_init_floor=dt_init_floor, norm_eps=norm_eps, use_bias=use_bias,
                use_conv_bias=use_conv_bias, implementation=implementation,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
