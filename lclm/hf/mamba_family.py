"""Mamba-family Hugging Face decoders: Mamba, Mamba-2 (read and written) and Jamba (read).

* **Mamba** (``MambaForCausalLM``): ``num_hidden_layers`` mixer-only blocks
  ``x + mixer(norm(x))`` (DecoderLM ``mlp_pattern="none"``) of the "mamba" mixer.
* **Mamba-2** (``Mamba2ForCausalLM``): the same with the "mamba2" mixer (in_proj order z,
  xBC, dt; gated RMSNorm after the gate, per group of d_inner / n_groups channels).
* **Jamba** (``JambaForCausalLM``): pre-norm blocks whose mixer is NoPE attention (layer i
  with ``i % attn_layer_period == attn_layer_offset``) or a Mamba layer with RMSNorms on dt,
  B and C (the "mamba" mixer's ``dt_bc_norm``), and whose feed-forward is a mixture of
  experts (``i % expert_layer_period == expert_layer_offset``; top-k softmax weights not
  renormalised) or a dense SwiGLU MLP.

Layouts: Hugging Face stores a linear layer as ``weight [out, in]`` (lclm: ``[in, out]``), a
depthwise convolution as ``conv1d.weight [channels, 1, taps]`` with the last tap on the
current token (lclm's ``conv_kernel [taps, channels]``: tap k weighs the token k steps
back, so the taps are reversed), Mamba's in_proj as ``[2 * d_inner, hidden]`` (x rows, then
z; lclm ``[hidden, 2, d_inner]``). Jamba's experts are read per expert
(``experts.{e}.gate_proj.weight`` ..., what the Hub and ``save_pretrained`` hold) or fused
(``experts.gate_up_proj [E, 2 * inter, hidden]``, ``experts.down_proj [E, hidden, inter]``,
transformers 5's layout in memory).

``residual_in_fp32`` is accepted: lclm's residual stream has the model's dtype, exact in
float32 (load with ``dtype="float32"`` for bit-faithful logits of a bfloat16 checkpoint).
Fields that only affect initialisation or the choice of kernels (``time_step_scale``,
``time_step_init_scheme``, ``rescale_prenorm_residual``, ``use_mambapy``, ``chunk_size``,
``use_mamba_kernels`` ...) are ignored; fields that change the computation in a way lclm
does not implement raise :class:`UnsupportedConfigError` naming them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from layers import Mamba2
from lclm.hf.mapping import (attention_params, fail as _fail, head_tensors,
                             linear_in as _linear_in, require)
from lclm.hf.pretrained import Architecture, register_architecture
from lclm.model.decoder import DecoderLM

_SILU = ("silu", "swish")


def _check_silu(config):
  activation = config.get("hidden_act", "silu")
  if activation not in _SILU:
    _fail(config["model_type"], "hidden_act", activation,
          "'silu' (the activation of the convolution, and of the MLPs)")


def _int_field(config, field, default=None):
  """config[field] as an int (an integral float such as 2.0 too); fails naming the field."""
  value = config.get(field, default)
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or
      not math.isfinite(value) or value != int(value) or value < 1):
    _fail(config["model_type"], field, value, "a positive integer")
  return int(value)


def _dt_rank(config, field, hidden):
  value = config.get(field, "auto")
  if value == "auto":
    return math.ceil(hidden / 16)
  return _int_field(config, field)


def _init_options(config) -> dict[str, Any]:
  """The mixers' dt initialisation ranges (no effect on a loaded model's computation)."""
  options = {}
  for field, option in (("time_step_min", "dt_min"), ("time_step_max", "dt_max"),
                        ("time_step_floor", "dt_init_floor")):
    value = config.get(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
      options[option] = float(value)
  if options.get("dt_min", 0.001) > options.get("dt_max", 0.1):
    options.pop("dt_min", None)
    options.pop("dt_max", None)
  return options


def _json_float(value):
  """A float of config.json; transformers writes infinities as {"__float__": "Infinity"}."""
  if isinstance(value, Mapping) and set(value) == {"__float__"}:
    value = value["__float__"]
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _conv_in(weight):
  """HF depthwise conv1d.weight [channels, 1, taps] -> lclm conv_kernel [taps, channels]
  (tap k on the token k steps back)."""
  return np.ascontiguousarray(np.asarray(weight)[:, 0, ::-1].T)


def _conv_out(kernel):
  """lclm conv_kernel [taps, channels] -> HF conv1d.weight [channels, 1, taps]."""
  return np.ascontiguousarray(np.asarray(kernel)[::-1].T[:, None, :])


# --------------------------------------------------------------------------------- Mamba


def mamba_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """DecoderLM options of a ``model_type`` "mamba" config."""
  model_type = config["model_type"]
  _check_silu(config)
  hidden = _int_field(config, "hidden_size")
  expand = _int_field(config, "expand", 2)
  inner = config.get("intermediate_size")
  if inner is not None and inner != expand * hidden:
    _fail(model_type, "intermediate_size", inner, f"expand * hidden_size = {expand * hidden}")
  mixer = dict(expand=expand, d_state=_int_field(config, "state_size", 16),
               d_conv=_int_field(config, "conv_kernel", 4),
               dt_rank=_dt_rank(config, "time_step_rank", hidden),
               use_bias=bool(config.get("use_bias", False)),
               use_conv_bias=bool(config.get("use_conv_bias", True)), **_init_options(config))
  scale = config.get("time_step_scale", 1.0)
  if isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < math.inf:
    mixer["dt_scale"] = float(scale)  # Initialisation only.
  return dict(vocab_size=_int_field(config, "vocab_size"), features=hidden,
              layer_pattern=["mamba"] * _int_field(config, "num_hidden_layers"),
              mixer_options={"mamba": mixer}, mlp_pattern="none",
              tie_embeddings=bool(config.get("tie_word_embeddings", True)),
              norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))


def _mamba_mixer_params(tensors, src: str, dst: tuple, *, d_inner: int, use_bias: bool,
                        use_conv_bias: bool, dt_bc_norm: bool) -> dict:
  """The "mamba" mixer's parameters (under ``dst``) from the tensors of HF ``MambaMixer`` /
  ``JambaMambaMixer`` named ``src`` + "in_proj.weight" etc."""
  in_proj = _linear_in(tensors[src + "in_proj.weight"])  # [hidden, 2 * d_inner]: x, then z
  params = {
      dst + ("in_proj",): in_proj.reshape(in_proj.shape[0], 2, d_inner),
      dst + ("conv_kernel",): _conv_in(tensors[src + "conv1d.weight"]),
      dst + ("x_proj",): _linear_in(tensors[src + "x_proj.weight"]),
      dst + ("dt_proj",): _linear_in(tensors[src + "dt_proj.weight"]),
      dst + ("dt_bias",): tensors[src + "dt_proj.bias"],
      dst + ("A_log",): tensors[src + "A_log"],
      dst + ("D",): tensors[src + "D"],
      dst + ("out_proj",): _linear_in(tensors[src + "out_proj.weight"]),
  }
  if use_bias:
    params[dst + ("in_proj_bias",)] = np.asarray(tensors[src + "in_proj.bias"]).reshape(
        2, d_inner)
    params[dst + ("out_proj_bias",)] = tensors[src + "out_proj.bias"]
  if use_conv_bias:
    params[dst + ("conv_bias",)] = tensors[src + "conv1d.bias"]
  if dt_bc_norm:
    for name, hf_name in (("dt_norm", "dt_layernorm"), ("B_norm", "b_layernorm"),
                          ("C_norm", "c_layernorm")):
      params[dst + (name, "scale")] = tensors[src + f"{hf_name}.weight"]
  return params


def _embeddings(tensors, prefix: str):
  for name in (prefix + "embeddings.weight", prefix + "embedding.weight"):
    if name in tensors:
      return tensors[name]
  raise KeyError(f"the checkpoint has no tensor {prefix + 'embeddings.weight'!r}")


def _backbone_params(config, tensors, options, mixer_params) -> dict:
  """Embedding, per-layer norm + mixer, final norm and lm_head of a MambaForCausalLM /
  Mamba2ForCausalLM checkpoint (``backbone.`` prefix)."""
  prefix = "backbone."
  params = {("embed", "embedding"): _embeddings(tensors, prefix),
            ("final_norm", "scale"): tensors[prefix + "norm_f.weight"]}
  if not options["tie_embeddings"]:
    params[("unembed", "kernel")] = _linear_in(tensors["lm_head.weight"])
  for i in range(len(options["layer_pattern"])):
    src, dst = f"{prefix}layers.{i}.", ("blocks", i)
    params[dst + ("mixer_norm", "scale")] = tensors[src + "norm.weight"]
    params.update(mixer_params(src + "mixer.", dst + ("mixer",)))
  return params


def mamba_params(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]):
  """{DecoderLM parameter path: array} of a MambaForCausalLM checkpoint."""
  options = mamba_options(config)
  mixer = options["mixer_options"]["mamba"]
  return _backbone_params(config, tensors, options, lambda src, dst: _mamba_mixer_params(
      tensors, src, dst, d_inner=mixer["expand"] * options["features"],
      use_bias=mixer["use_bias"], use_conv_bias=mixer["use_conv_bias"], dt_bc_norm=False))


# ------------------------------------------------------------------------------- Mamba-2


def mamba2_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """DecoderLM options of a ``model_type`` "mamba2" config."""
  model_type = config["model_type"]
  _check_silu(config)
  hidden = _int_field(config, "hidden_size")
  expand = _int_field(config, "expand", 2)
  head_dim = _int_field(config, "head_dim", 64)
  n_groups = _int_field(config, "n_groups", 8)
  d_inner = expand * hidden
  if d_inner % head_dim:
    _fail(model_type, "head_dim", head_dim,
          f"a divisor of expand * hidden_size = {d_inner}")
  heads = d_inner // head_dim
  num_heads = config.get("num_heads", heads)
  if num_heads != heads:
    _fail(model_type, "num_heads", num_heads,
          f"expand * hidden_size / head_dim = {d_inner} / {head_dim} = {heads}")
  if heads % n_groups:
    _fail(model_type, "n_groups", n_groups, f"a divisor of num_heads = {heads}")
  limit = config.get("time_step_limit", (0.0, math.inf))
  if (not isinstance(limit, (list, tuple)) or len(limit) != 2 or _json_float(limit[0]) != 0 or
      _json_float(limit[1]) != math.inf):
    _fail(model_type, "time_step_limit", limit, "(0.0, inf): dt is not clamped")
  if config.get("norm_before_gate", False):
    _fail(model_type, "norm_before_gate", config["norm_before_gate"],
          "False (the gated RMSNorm normalises y * silu(z))")
  if not config.get("rms_norm", True):
    _fail(model_type, "rms_norm", config["rms_norm"], "True (a gated RMSNorm before out_proj)")
  eps = float(config.get("layer_norm_epsilon", 1e-5))
  mixer = dict(expand=expand, head_dim=head_dim, d_state=_int_field(config, "state_size", 128),
               n_groups=n_groups, d_conv=_int_field(config, "conv_kernel", 4), norm_eps=eps,
               use_bias=bool(config.get("use_bias", False)),
               use_conv_bias=bool(config.get("use_conv_bias", True)), **_init_options(config))
  return dict(vocab_size=_int_field(config, "vocab_size"), features=hidden,
              layer_pattern=["mamba2"] * _int_field(config, "num_hidden_layers"),
              mixer_options={"mamba2": mixer}, mlp_pattern="none",
              tie_embeddings=bool(config.get("tie_word_embeddings", False)), norm_eps=eps)


def _mamba2_mixer_params(tensors, src: str, dst: tuple, *, use_bias: bool,
                         use_conv_bias: bool) -> dict:
  params = {
      dst + ("in_proj", "kernel"): _linear_in(tensors[src + "in_proj.weight"]),
      dst + ("conv_kernel",): _conv_in(tensors[src + "conv1d.weight"]),
      dst + ("dt_bias",): tensors[src + "dt_bias"],
      dst + ("A_log",): tensors[src + "A_log"],
      dst + ("D",): tensors[src + "D"],
      dst + ("norm_scale",): tensors[src + "norm.weight"],
      dst + ("out_proj", "kernel"): _linear_in(tensors[src + "out_proj.weight"]),
  }
  if use_bias:
    params[dst + ("in_proj", "bias")] = tensors[src + "in_proj.bias"]
    params[dst + ("out_proj", "bias")] = tensors[src + "out_proj.bias"]
  if use_conv_bias:
    params[dst + ("conv_bias",)] = tensors[src + "conv1d.bias"]
  return params


def mamba2_params(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]):
  """{DecoderLM parameter path: array} of a Mamba2ForCausalLM checkpoint."""
  options = mamba2_options(config)
  mixer = options["mixer_options"]["mamba2"]
  return _backbone_params(config, tensors, options, lambda src, dst: _mamba2_mixer_params(
      tensors, src, dst, use_bias=mixer["use_bias"], use_conv_bias=mixer["use_conv_bias"]))


def mamba2_export_config(model: DecoderLM) -> dict[str, Any]:
  """The Mamba2ForCausalLM config of a model it expresses exactly: every layer a "mamba2"
  mixer with the same options, mixer-only blocks with plain RMSNorms, one epsilon for the
  block, final and gated norms; raises UnsupportedConfigError naming what differs."""
  require(model.final_logits_soft_cap is None, "Mamba2ForCausalLM has no final_logits_soft_cap.")
  require(model.embedding_multiplier is None, "Mamba2ForCausalLM has no embedding_multiplier.")
  require(model.final_norm.scale_offset == 0,
           "norm_scale_offset must be 0 (Mamba2RMSNorm multiplies by its weight).")
  eps = {float(model.final_norm.eps)}
  first = None
  for index, block in enumerate(model.layer_blocks()):
    where = f"layer {index}"
    mixer = block.mixer
    require(isinstance(mixer, Mamba2), f"{where}: every layer must be a 'mamba2' mixer, got "
             f"{type(mixer).__name__} (layer_pattern {list(model.layer_pattern)}).")
    require(block.mlp is None, f"{where}: Mamba2ForCausalLM blocks have no MLP "
             f"(mlp_pattern must be 'none', got {model.mlp_pattern[index]!r}).")
    require(block.short_conv is None, f"{where}: Mamba2ForCausalLM has no short_conv_size.")
    require(block.post_mixer_norm is None, f"{where}: Mamba2ForCausalLM has no post_norms.")
    require(block.mixer_norm.scale_offset == 0, f"{where}: norm_scale_offset must be 0.")
    signature = dict(head_dim=mixer.head_dim, d_inner=mixer.d_inner, d_state=mixer.d_state,
                     n_groups=mixer.n_groups, d_conv=mixer.d_conv,
                     use_bias=bool(mixer.in_proj.use_bias),
                     use_conv_bias=mixer.conv_bias is not None, chunk_size=mixer.chunk_size)
    require(first is None or signature == first,
             f"{where}: every layer must share the mamba2 options; layer 0 has {first}, "
             f"{where} {signature}.")
    first = signature
    eps.update((float(block.mixer_norm.eps), float(mixer.norm_eps)))
  require(len(eps) == 1, f"Mamba2ForCausalLM has one layer_norm_epsilon for the block, final "
           f"and gated norms; the model has {sorted(eps)} (norm_eps and the mamba2 norm_eps).")
  vocab, features = model.embed.embedding[...].shape
  require(first["d_inner"] % features == 0,
           f"d_inner = {first['d_inner']} must be a multiple of features = {features}.")
  return {
      "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
      "vocab_size": int(vocab), "hidden_size": int(features),
      "num_hidden_layers": model.num_layers, "expand": first["d_inner"] // int(features),
      "num_heads": first["d_inner"] // first["head_dim"], "head_dim": first["head_dim"],
      "state_size": first["d_state"], "n_groups": first["n_groups"],
      "conv_kernel": first["d_conv"], "use_bias": first["use_bias"],
      "use_conv_bias": first["use_conv_bias"], "hidden_act": "silu",
      "layer_norm_epsilon": eps.pop(), "residual_in_fp32": False,
      "tie_word_embeddings": bool(model.tie_embeddings),
      "chunk_size": first["chunk_size"] or 256,
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
  }


def mamba2_export_params(config: Mapping[str, Any], params) -> dict[str, np.ndarray]:
  """{HF tensor name: array} of a DecoderLM whose config :func:`mamba2_export_config` gave."""
  tensors = head_tensors(params, embedding="backbone.embeddings.weight",
                         final_norm="backbone.norm_f.weight", tied=config["tie_word_embeddings"])
  for i in range(config["num_hidden_layers"]):
    src, dst = ("blocks", i), f"backbone.layers.{i}."
    mixer, out = src + ("mixer",), dst + "mixer."
    tensors[dst + "norm.weight"] = params[src + ("mixer_norm", "scale")]
    tensors[out + "in_proj.weight"] = params[mixer + ("in_proj", "kernel")].T
    tensors[out + "conv1d.weight"] = _conv_out(params[mixer + ("conv_kernel",)])
    for name in ("dt_bias", "A_log", "D"):
      tensors[out + name] = params[mixer + (name,)]
    tensors[out + "norm.weight"] = params[mixer + ("norm_scale",)]
    tensors[out + "out_proj.weight"] = params[mixer + ("out_proj", "kernel")].T
    if config["use_bias"]:
      tensors[out + "in_proj.bias"] = params[mixer + ("in_proj", "bias")]
      tensors[out + "out_proj.bias"] = params[mixer + ("out_proj", "bias")]
    if config["use_conv_bias"]:
      tensors[out + "conv1d.bias"] = params[mixer + ("conv_bias",)]
  return {name: np.ascontiguousarray(a) for name, a in tensors.items()}


# --------------------------------------------------------------------------------- Jamba


def _num_experts(config) -> int:
  """``num_experts`` (older configs: ``num_local_experts``; transformers' default 16)."""
  if "num_experts" not in config and "num_local_experts" in config:
    config = {**config, "num_experts": config["num_local_experts"]}
  return _int_field(config, "num_experts", 16)


def _jamba_layout(config) -> tuple[list[str], list[str]]:
  """(mixer per layer: "attention" | "mamba", feed-forward per layer: "moe" | "gated")."""
  model_type = config["model_type"]
  n = _int_field(config, "num_hidden_layers")
  periods = {}
  for period, offset, default in (("attn_layer_period", "attn_layer_offset", (8, 4)),
                                  ("expert_layer_period", "expert_layer_offset", (2, 1))):
    p = _int_field(config, period, default[0])
    o = config.get(offset, default[1])
    if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < p:
      _fail(model_type, offset, o, f"an int in [0, {period} = {p})")
    periods[period] = (p, o)
  attn_p, attn_o = periods["attn_layer_period"]
  expert_p, expert_o = periods["expert_layer_period"]
  num_experts = _num_experts(config)
  mixers = ["attention" if i % attn_p == attn_o else "mamba" for i in range(n)]
  mlps = ["moe" if num_experts > 1 and i % expert_p == expert_o else "gated" for i in range(n)]
  return mixers, mlps


def jamba_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """DecoderLM options of a ``model_type`` "jamba" config."""
  model_type = config["model_type"]
  _check_silu(config)
  if config.get("sliding_window"):
    _fail(model_type, "sliding_window", config["sliding_window"], "None (full attention)")
  hidden = _int_field(config, "hidden_size")
  heads = _int_field(config, "num_attention_heads")
  head_dim = config.get("head_dim") or hidden // heads
  eps = float(config.get("rms_norm_eps", 1e-6))
  mixers, mlps = _jamba_layout(config)
  # transformers' default is 8 key/value heads; an explicit None means one per query head.
  kv_heads = (heads if config.get("num_key_value_heads", 8) is None else
              _int_field(config, "num_key_value_heads", 8))
  mixer_options = {}
  if "attention" in mixers:
    mixer_options["attention"] = dict(num_heads=heads, num_kv_heads=kv_heads,
                                      head_dim=int(head_dim), rope_theta=None)
  if "mamba" in mixers:
    mixer_options["mamba"] = dict(
        expand=_int_field(config, "mamba_expand", 2),
        d_state=_int_field(config, "mamba_d_state", 16),
        d_conv=_int_field(config, "mamba_d_conv", 4),
        dt_rank=_dt_rank(config, "mamba_dt_rank", hidden),
        use_bias=bool(config.get("mamba_proj_bias", False)),
        use_conv_bias=bool(config.get("mamba_conv_bias", True)), dt_bc_norm=True,
        dt_bc_norm_eps=eps)
  options = dict(
      vocab_size=_int_field(config, "vocab_size"), features=hidden, layer_pattern=mixers,
      mixer_options=mixer_options, mlp_pattern=mlps,
      mlp_hidden_features=_int_field(config, "intermediate_size"), mlp_activation="silu",
      tie_embeddings=bool(config.get("tie_word_embeddings", False)), norm_eps=eps)
  if "moe" in mlps:
    options["moe_options"] = dict(
        num_experts=_num_experts(config),
        num_experts_per_token=_int_field(config, "num_experts_per_tok", 2),
        normalize_top_k=False)
  return options


def _jamba_experts(tensors, src: str, num_experts: int) -> tuple:
  """(gate, up [E, hidden, inter], down [E, inter, hidden]) of ``src`` + "experts.", fused
  (transformers 5 in memory) or per expert (the Hub's and save_pretrained's files)."""
  fused = src + "experts.gate_up_proj"
  if fused in tensors:
    gate_up = np.asarray(tensors[fused])  # [E, 2 * inter, hidden]
    gate, up = np.split(gate_up, 2, axis=1)
    down = np.asarray(tensors[src + "experts.down_proj"])  # [E, hidden, inter]
    return (gate.transpose(0, 2, 1), up.transpose(0, 2, 1), down.transpose(0, 2, 1))
  stacked = []
  for name in ("gate_proj", "up_proj", "down_proj"):
    stacked.append(np.stack([_linear_in(tensors[src + f"experts.{e}.{name}.weight"])
                             for e in range(num_experts)]))
  return tuple(stacked)


def jamba_params(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]):
  """{DecoderLM parameter path: array} of a JambaForCausalLM checkpoint."""
  options = jamba_options(config)
  d = options["features"]
  params = {("embed", "embedding"): tensors["model.embed_tokens.weight"],
            ("final_norm", "scale"): tensors["model.final_layernorm.weight"]}
  if not options["tie_embeddings"]:
    params[("unembed", "kernel")] = _linear_in(tensors["lm_head.weight"])
  for i, (mixer, mlp) in enumerate(zip(options["layer_pattern"], options["mlp_pattern"])):
    src, dst = f"model.layers.{i}.", ("blocks", i)
    params[dst + ("mixer_norm", "scale")] = tensors[src + "input_layernorm.weight"]
    params[dst + ("mlp_norm", "scale")] = tensors[src + "pre_ff_layernorm.weight"]
    if mixer == "attention":
      o = options["mixer_options"]["attention"]
      params.update(attention_params(tensors, src + "self_attn.", dst, features=d,
                                     heads=o["num_heads"], kv_heads=o["num_kv_heads"],
                                     head_dim=o["head_dim"]))
    else:
      o = options["mixer_options"]["mamba"]
      params.update(_mamba_mixer_params(
          tensors, src + "mamba.", dst + ("mixer",), d_inner=o["expand"] * d,
          use_bias=o["use_bias"], use_conv_bias=o["use_conv_bias"], dt_bc_norm=True))
    ff = src + "feed_forward."
    if mlp == "moe":
      params[dst + ("mlp", "router", "kernel")] = _linear_in(tensors[ff + "router.weight"])
      gate, up, down = _jamba_experts(tensors, ff, options["moe_options"]["num_experts"])
      params[dst + ("mlp", "gate")] = gate
      params[dst + ("mlp", "up")] = up
      params[dst + ("mlp", "down")] = down
    else:
      for name in ("gate", "up", "down"):
        params[dst + ("mlp", name, "kernel")] = _linear_in(tensors[ff + f"{name}_proj.weight"])
  return params


register_architecture(Architecture(
    name="mamba", model_types=("mamba",), decoder_options=mamba_options,
    load_params=mamba_params))
register_architecture(Architecture(
    name="mamba2", model_types=("mamba2",), decoder_options=mamba2_options,
    load_params=mamba2_params, export_config=mamba2_export_config,
    export_params=mamba2_export_params))
register_architecture(Architecture(
    name="jamba", model_types=("jamba",), decoder_options=jamba_options,
    load_params=jamba_params))
