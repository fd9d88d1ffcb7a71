"""The "s4d" mixer: the diagonal state-space layer S4D (Gu et al. 2022), S4D-Lin or S4D-Inv
initialisation, zero-order-hold discretisation; for Long Range Arena-style work.

Importing this module registers the name; then e.g.
``DecoderLM(..., layer_pattern=["s4d", "attention"], mixer_options={"s4d": {"state_size":
64}, "attention": {"num_heads": 4}})``.
"""

from __future__ import annotations

from flax import nnx

from layers.s4d import S4D
from lclm.model.registry import register_mixer


@register_mixer("s4d")
def s4d(features: int, *, rngs: nnx.Rngs, dtype, param_dtype, state_size: int = 64,
        init: str = "lin", dt_min: float = 0.001, dt_max: float = 0.1,
        bidirectional: bool = False) -> S4D:
  """:class:`layers.s4d.S4D` over the model features: ``state_size`` (N, even; N / 2
  complex states per channel), ``init`` "lin" (S4D-Lin) or "inv" (S4D-Inv), the range
  [dt_min, dt_max] of the log-uniform initial steps, ``bidirectional`` (non-causal, for
  encoders: no state, and not for a causal decoder). The layer exposes its state
  (``init_state``, ``state=`` / ``return_state=``): [batch, features, N / 2, 2] float32
  (the complex state as real/imag pairs), and a decode cache of the same shape
  (``init_cache(batch, max_length)``, ``cache=``, ``num_new_tokens=``; none when
  bidirectional).
  """
  return S4D(features, state_size=state_size, init=init, dt_min=dt_min, dt_max=dt_max,
             bidirectional=bidirectional, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
