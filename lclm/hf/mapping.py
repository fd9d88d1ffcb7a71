"""Pieces shared by the architecture mappings of lclm.hf: refusals and tensor layouts.

Hugging Face stores a linear layer as ``weight [out, in]``; lclm's kernels are ``[in, out]``,
the attention projections ``q_proj [features, heads, head_dim]`` and ``o_proj [heads,
head_dim, features]``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from lclm.hf.pretrained import UnsupportedConfigError


def fail(model_type: str, field: str, value, expected) -> None:
  """Raises UnsupportedConfigError for a config field lclm cannot express."""
  raise UnsupportedConfigError(f"config.json ({model_type}): {field} = {value!r} is not "
                               f"supported; lclm reads {expected}.")


def require(condition: bool, what: str) -> None:
  """Raises UnsupportedConfigError (an export the architecture cannot express) unless
  ``condition``."""
  if not condition:
    raise UnsupportedConfigError(f"save_pretrained: {what}")


def linear_in(weight) -> np.ndarray:
  """HF weight [out, in] -> [in, out]."""
  return np.asarray(weight).T


def attention_params(tensors: Mapping[str, np.ndarray], prefix: str, dst: tuple, *,
                     features: int, heads: int, kv_heads: int, head_dim: int,
                     qkv=None) -> dict:
  """The parameters of one :class:`layers.Attention` from ``{prefix}{q,k,v,o}_proj.weight``
  (and their biases and ``q_norm`` / ``k_norm`` when the checkpoint has them) at ``dst +
  ("mixer", ...)``. ``qkv``: the (q, k, v) weights when a fused projection held them."""
  q, k, v = qkv or tuple(tensors[prefix + f"{n}_proj.weight"] for n in "qkv")
  params = {}
  for name, weight, h in (("q_proj", q, heads), ("k_proj", k, kv_heads),
                          ("v_proj", v, kv_heads)):
    params[dst + ("mixer", name, "kernel")] = linear_in(weight).reshape(features, h, head_dim)
    if prefix + f"{name}.bias" in tensors:
      params[dst + ("mixer", name, "bias")] = np.asarray(
          tensors[prefix + f"{name}.bias"]).reshape(h, head_dim)
  params[dst + ("mixer", "o_proj", "kernel")] = linear_in(
      tensors[prefix + "o_proj.weight"]).reshape(heads, head_dim, features)
  if prefix + "o_proj.bias" in tensors:
    params[dst + ("mixer", "o_proj", "bias")] = tensors[prefix + "o_proj.bias"]
  if prefix + "q_norm.weight" in tensors:
    params[dst + ("mixer", "q_norm", "scale")] = tensors[prefix + "q_norm.weight"]
    params[dst + ("mixer", "k_norm", "scale")] = tensors[prefix + "k_norm.weight"]
  return params


def head_tensors(params, *, embedding: str, final_norm: str, tied: bool) -> dict:
  """The embedding, final norm and (untied) ``lm_head.weight`` tensors of an export, named
  ``embedding`` and ``final_norm``."""
  tensors = {embedding: params[("embed", "embedding")],
             final_norm: params[("final_norm", "scale")]}
  if not tied:
    tensors["lm_head.weight"] = params[("unembed", "kernel")].T
  return tensors
