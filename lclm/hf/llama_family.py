"""Llama-like Hugging Face decoders: Llama, Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Gemma 2,
Gemma 3 (text).

All are pre-norm attention + gated-MLP decoders; they differ in biases (Qwen2), QK-norm
(Qwen3, Gemma 3), fused projections (Phi-3), sliding-window layers (Mistral, Phi-3, Gemma,
Qwen with ``use_sliding_window``), per-layer RoPE (Gemma 3's local base) and Gemma's norms
and scalings; Mixtral's MLPs are mixtures of experts (:class:`layers.MoEMLP`, top-k weights
renormalised). Sliding-window layers become ``"local_attention"`` (window counted as Hugging
Face's ``sliding_window``: the query and the ``window - 1`` tokens before it), full layers
``"attention"``.

Hugging Face stores a linear layer as ``weight [out, in]``; lclm's attention kernels are
``q_proj [features, heads, head_dim]``, ``o_proj [heads, head_dim, features]`` and the MLP's
``[in, out]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from layers import Attention, GatedMLP
from lclm.hf.mapping import (attention_params, fail as _fail, head_tensors,
                             linear_in as _linear_in, require)
from lclm.hf.pretrained import Architecture, register_architecture
from lclm.model.decoder import DecoderLM

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu",
                "gelu_new": "gelu"}
_GEMMA = ("gemma2", "gemma3_text")
# The rope scaling types of transformers that lclm's rope_frequencies implements.
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def _head_dim(config) -> int:
  head_dim = config.get("head_dim")
  return int(head_dim) if head_dim else config["hidden_size"] // config["num_attention_heads"]


def _layer_types(config) -> list[str]:
  """"sliding_attention" / "full_attention" per layer (transformers 5 writes
  ``layer_types``; older configs imply them)."""
  n, model_type = config["num_hidden_layers"], config["model_type"]
  if config.get("layer_types"):
    types = list(config["layer_types"])
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
      _fail(model_type, "layer_types", types,
            f"{n} entries of 'sliding_attention' / 'full_attention'")
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
      return ["full_attention"] * n
    if not config.get("sliding_window"):
      return ["full_attention"] * n
    return types
  if model_type == "gemma2":
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
  if model_type == "gemma3_text":
    pattern = config.get("sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(n)]
  if model_type in ("qwen2", "qwen3"):
    if config.get("use_sliding_window") and config.get("sliding_window"):
      first = config.get("max_window_layers", n)
      return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return ["full_attention"] * n
  return ["sliding_attention" if config.get("sliding_window") else "full_attention"] * n


def _rope(config, layer_type: str) -> dict[str, Any]:
  """rope_theta, rope_scaling (None for plain RoPE) and partial_rotary_factor of a layer
  type, from transformers 5's ``rope_parameters`` or the older ``rope_theta`` /
  ``rope_scaling`` / ``rope_local_base_freq`` fields."""
  model_type = config["model_type"]
  parameters = config.get("rope_parameters")
  if parameters and layer_type in parameters:
    parameters = parameters[layer_type]
  if parameters:
    parameters = dict(parameters)
    theta = parameters.pop("rope_theta", config.get("rope_theta", 10000.0))
    partial = parameters.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
  else:
    theta = config.get("rope_theta", 10000.0)
    partial = config.get("partial_rotary_factor", 1.0)
    parameters = dict(config.get("rope_scaling") or {})
    if model_type == "gemma3_text" and layer_type == "sliding_attention":
      theta, parameters = config.get("rope_local_base_freq", 10000.0), {}
  rope_type = parameters.pop("rope_type", parameters.pop("type", "default"))
  if rope_type not in _ROPE_TYPES:
    _fail(model_type, "rope_type", rope_type, list(_ROPE_TYPES))
  if rope_type == "default":
    return dict(rope_theta=float(theta), rope_scaling=None,
                partial_rotary_factor=float(partial or 1.0))
  if rope_type == "longrope" and "original_max_position_embeddings" not in parameters:
    parameters["original_max_position_embeddings"] = config["original_max_position_embeddings"]
  scaling = {"rope_type": rope_type, **{k: _plain(v) for k, v in parameters.items()}}
  return dict(rope_theta=float(theta), rope_scaling=scaling,
              partial_rotary_factor=float(partial or 1.0))


def _plain(value):
  return list(value) if isinstance(value, tuple) else value


def decoder_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """DecoderLM options of a Llama-family config."""
  model_type = config["model_type"]
  gemma = model_type in _GEMMA
  activation = config.get("hidden_activation") or config.get("hidden_act", "silu")
  if gemma and config.get("hidden_activation") is None:
    activation = "gelu_pytorch_tanh"  # Gemma's documented default.
  if activation not in _ACTIVATIONS:
    _fail(model_type, "hidden_act", activation, sorted(_ACTIVATIONS))
  if config.get("mlp_bias"):
    _fail(model_type, "mlp_bias", True, "bias-free MLPs")
  attention_bias = bool(config.get("attention_bias", False))
  head_dim = _head_dim(config)
  shared = dict(num_heads=config["num_attention_heads"],
                num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                head_dim=head_dim,
                qkv_bias=True if model_type == "qwen2" else attention_bias,
                output_bias=False if model_type == "qwen2" else attention_bias)
  if model_type in ("qwen3", "gemma3_text"):
    shared.update(use_qk_norm=True, qk_norm_eps=config.get("rms_norm_eps", 1e-6),
                  qk_norm_scale_offset=1.0 if gemma else 0.0)
  if gemma:
    shared["attention_scale"] = float(config.get("query_pre_attn_scalar", head_dim)) ** -0.5
    if config.get("attn_logit_softcapping"):
      shared["logits_soft_cap"] = float(config["attn_logit_softcapping"])

  types = _layer_types(config)
  pattern = ["local_attention" if t == "sliding_attention" else "attention" for t in types]
  full_rope = _rope(config, "full_attention")
  positions = dict(full_rope, max_position_embeddings=config.get("max_position_embeddings"))
  mixer_options = {}
  if "local_attention" in pattern:
    local = {"window": int(config["sliding_window"])}
    sliding_rope = _rope(config, "sliding_attention")
    local.update({k: v for k, v in sliding_rope.items() if v != full_rope[k]})
    mixer_options["local_attention"] = local
  if "attention" in pattern and "local_attention" in pattern:
    pass  # The full layers take position_options as they are.
  options = dict(
      vocab_size=config["vocab_size"], features=config["hidden_size"], layer_pattern=pattern,
      shared_mixer_options=shared, position_options=positions, mixer_options=mixer_options,
      mlp_hidden_features=config["intermediate_size"], mlp_activation=_ACTIVATIONS[activation],
      tie_embeddings=bool(config.get("tie_word_embeddings", gemma)),
      norm_eps=float(config.get("rms_norm_eps", 1e-6)))
  if model_type == "mixtral":
    options.update(mlp_pattern="moe", moe_options={
        "num_experts": int(config["num_local_experts"]),
        "num_experts_per_token": int(config["num_experts_per_tok"]), "normalize_top_k": True})
  if gemma:
    options.update(norm_scale_offset=1.0, post_norms=True,
                   embedding_multiplier=float(config["hidden_size"]) ** 0.5)
    if config.get("final_logit_softcapping"):
      options["final_logits_soft_cap"] = float(config["final_logit_softcapping"])
  return options


# ------------------------------------------------------------------------------- weights


def load_params(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]):
  """{DecoderLM parameter path: array} of a Llama-family checkpoint."""
  model_type = config["model_type"]
  gemma = model_type in _GEMMA
  d, n_layers = config["hidden_size"], config["num_hidden_layers"]
  heads = config["num_attention_heads"]
  kv_heads = config.get("num_key_value_heads") or heads
  head_dim = _head_dim(config)
  prefix = "model."
  params = {("embed", "embedding"): tensors[prefix + "embed_tokens.weight"],
            ("final_norm", "scale"): tensors[prefix + "norm.weight"]}
  tied = bool(config.get("tie_word_embeddings", gemma))
  if not tied:
    params[("unembed", "kernel")] = _linear_in(tensors["lm_head.weight"])
  for i in range(n_layers):
    src, dst = f"{prefix}layers.{i}.", ("blocks", i)
    attn = src + "self_attn."
    qkv = None
    if model_type == "phi3":
      qkv = np.split(np.asarray(tensors[attn + "qkv_proj.weight"]),
                     [heads * head_dim, (heads + kv_heads) * head_dim], axis=0)
    params.update(attention_params(tensors, attn, dst, features=d, heads=heads,
                                   kv_heads=kv_heads, head_dim=head_dim, qkv=qkv))
    params[dst + ("mixer_norm", "scale")] = tensors[src + "input_layernorm.weight"]
    if gemma:
      params[dst + ("post_mixer_norm", "scale")] = tensors[src + "post_attention_layernorm.weight"]
      params[dst + ("mlp_norm", "scale")] = tensors[src + "pre_feedforward_layernorm.weight"]
      params[dst + ("post_mlp_norm", "scale")] = tensors[
          src + "post_feedforward_layernorm.weight"]
    else:
      params[dst + ("mlp_norm", "scale")] = tensors[src + "post_attention_layernorm.weight"]
    mlp = src + "mlp."
    if model_type == "mixtral":
      params.update(_mixtral_experts(tensors, src + "block_sparse_moe.", dst,
                                     config["num_local_experts"]))
      continue
    if model_type == "phi3":
      gate, up = np.split(tensors[mlp + "gate_up_proj.weight"], 2, axis=0)
    else:
      gate, up = tensors[mlp + "gate_proj.weight"], tensors[mlp + "up_proj.weight"]
    params[dst + ("mlp", "gate", "kernel")] = _linear_in(gate)
    params[dst + ("mlp", "up", "kernel")] = _linear_in(up)
    params[dst + ("mlp", "down", "kernel")] = _linear_in(tensors[mlp + "down_proj.weight"])
  return params


def _mixtral_experts(tensors, prefix: str, dst: tuple, num_experts: int) -> dict:
  """Router and experts of one Mixtral block: ``gate.weight`` [E, features] and per expert
  ``experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down), as transformers writes them."""
  params = {dst + ("mlp", "router", "kernel"): _linear_in(tensors[prefix + "gate.weight"])}
  for name, hf_name in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
    params[dst + ("mlp", name)] = np.stack(
        [_linear_in(tensors[prefix + f"experts.{e}.{hf_name}.weight"])
         for e in range(num_experts)])
  return params


# ------------------------------------------------------------------------------- export


def _export_config(model: DecoderLM, model_type: str) -> dict[str, Any]:
  """The Hugging Face config of a model that ``model_type`` expresses exactly."""
  names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM"}
  require(not model.final_logits_soft_cap and not model.embedding_multiplier,
           f"{model_type} has no final logit soft cap or embedding multiplier.")
  blocks = model.layer_blocks()
  windows, eps, mlp_sizes, first = set(), set(), set(), None
  for index, block in enumerate(blocks):
    mixer, mlp = block.mixer, block.mlp
    where = f"layer {index}"
    require(isinstance(mixer, Attention), f"{where}: {model_type} layers are attention, got "
             f"{type(mixer).__name__}.")
    require(isinstance(mlp, GatedMLP) and mlp.activation == "silu",
             f"{where}: {model_type} needs a SwiGLU MLP (mlp_pattern 'gated', silu).")
    require(block.short_conv is None and block.post_mixer_norm is None,
             f"{where}: {model_type} has no short convolution or post norms.")
    require(block.mixer_norm.scale_offset == 0 and mixer.q_norm is None,
             f"{where}: {model_type} has plain RMSNorms and no QK-norm.")
    require(mixer.rotary is not None and mixer.position_extension is None and
             mixer.logits_soft_cap is None and mixer.query_multiplier is None and
             mixer.mask is None and not mixer.num_sink_tokens and mixer.chunk_size is None,
             f"{where}: {model_type} attention is RoPE attention without soft cap, custom "
             "scale, masks, sinks or position extensions.")
    rotary = mixer.rotary
    require(len(set(rotary.thetas)) == 1 and rotary.layout == "half" and
             rotary.partial_rotary_factor == 1.0,
             f"{where}: {model_type} takes one rope_theta, rope_layout 'half' and full rotary.")
    signature = (mixer.num_heads, mixer.num_kv_heads, mixer.head_dim, rotary.thetas[0],
                 rotary.scaling, rotary.max_position_embeddings,
                 mixer.q_proj.use_bias, mixer.o_proj.use_bias)
    require(first is None or signature == first,
             f"{where}: every layer must share heads, RoPE and biases ({model_type}).")
    first = signature
    windows.add(None if mixer.local_window_size is None else mixer.local_window_size)
    eps.update((block.mixer_norm.eps, block.mlp_norm.eps))
    mlp_sizes.add(mlp.gate.kernel[...].shape[1])
  eps.add(model.final_norm.eps)
  require(len(eps) == 1 and len(mlp_sizes) == 1, "one norm eps and one MLP size for all layers.")
  heads, kv_heads, head_dim, theta, scaling, max_positions, qkv_bias, o_bias = first
  if model_type == "qwen2":
    require(qkv_bias and not o_bias, "qwen2 has q/k/v biases and no output bias.")
  else:
    require(qkv_bias == o_bias, f"{model_type} has biases on all of q, k, v, o or none.")
    require(model_type == "llama" or not qkv_bias, f"{model_type} has no attention biases.")
  sliding = None
  if windows != {None}:
    require(model_type == "mistral" and len(windows) == 1,
             f"sliding windows: {model_type} has none; a sliding window in every layer is "
             "mistral.")
    left = windows.pop()
    left = left if isinstance(left, int) else left[0]
    sliding = int(left) + 1
  vocab, features = model.embed.embedding[...].shape
  config = {
      "architectures": [names[model_type]], "model_type": model_type,
      "vocab_size": int(vocab), "hidden_size": int(features),
      "intermediate_size": int(mlp_sizes.pop()), "num_hidden_layers": len(blocks),
      "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
      "hidden_act": "silu", "rms_norm_eps": float(eps.pop()),
      "tie_word_embeddings": bool(model.tie_embeddings),
      "max_position_embeddings": int(max_positions or 4096),
      "rope_theta": float(theta),
      "rope_scaling": None if scaling is None else {k: _plain(v) for k, v in scaling},
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
  }
  if config["rope_scaling"] is not None:
    config["rope_parameters"] = {"rope_theta": float(theta), **config["rope_scaling"]}
  else:
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
  if model_type == "llama":
    config.update(attention_bias=bool(qkv_bias), mlp_bias=False)
  if model_type == "mistral":
    config["sliding_window"] = sliding
  if model_type == "qwen2":
    config.update(use_sliding_window=False, sliding_window=None,
                  max_window_layers=len(blocks))
  return config


def _export_params(config: Mapping[str, Any], params) -> dict[str, np.ndarray]:
  d = config["hidden_size"]
  tensors = head_tensors(params, embedding="model.embed_tokens.weight",
                         final_norm="model.norm.weight", tied=config["tie_word_embeddings"])
  for i in range(config["num_hidden_layers"]):
    src, dst = ("blocks", i), f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj"):
      kernel = params[src + ("mixer", name, "kernel")]
      tensors[dst + f"self_attn.{name}.weight"] = kernel.reshape(d, -1).T
      if src + ("mixer", name, "bias") in params:
        tensors[dst + f"self_attn.{name}.bias"] = params[src + ("mixer", name, "bias")].reshape(-1)
    tensors[dst + "self_attn.o_proj.weight"] = params[src + ("mixer", "o_proj", "kernel")
                                                      ].reshape(-1, d).T
    if src + ("mixer", "o_proj", "bias") in params:
      tensors[dst + "self_attn.o_proj.bias"] = params[src + ("mixer", "o_proj", "bias")]
    tensors[dst + "input_layernorm.weight"] = params[src + ("mixer_norm", "scale")]
    tensors[dst + "post_attention_layernorm.weight"] = params[src + ("mlp_norm", "scale")]
    for name in ("gate", "up", "down"):
      tensors[dst + f"mlp.{name}_proj.weight"] = params[src + ("mlp", name, "kernel")].T
  return {name: np.ascontiguousarray(a) for name, a in tensors.items()}


_IGNORED = (r".*rotary_emb\.inv_freq",)

for _name, _types in (("llama", ("llama",)), ("mistral", ("mistral",)), ("qwen2", ("qwen2",))):
  register_architecture(Architecture(
      name=_name, model_types=_types, decoder_options=decoder_options, load_params=load_params,
      ignored=_IGNORED, export_config=lambda model, _t=_name: _export_config(model, _t),
      export_params=_export_params))
for _name, _types in (("mixtral", ("mixtral",)), ("qwen3", ("qwen3",)), ("phi3", ("phi3",)),
                      ("gemma2", ("gemma2",)), ("gemma3", ("gemma3_text",))):
  register_architecture(Architecture(
      name=_name, model_types=_types, decoder_options=decoder_options, load_params=load_params,
      ignored=_IGNORED))
