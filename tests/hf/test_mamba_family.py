"""Hugging Face Mamba, Mamba-2 and Jamba checkpoints load as DecoderLM with transformers'
logits; a DecoderLM of Mamba-2 layers exports to a checkpoint transformers reads.

Each architecture: a tiny random transformers model with every parameter perturbed (norms,
biases, A_log, D, dt biases included), saved with ``save_pretrained``, loaded with
``lclm.hf.load_pretrained`` and compared on a [2, 21] batch in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import layers  # noqa: E402
import lclm.hf  # noqa: E402
from lclm.hf import UnsupportedConfigError, files, mamba_family  # noqa: E402
from lclm.inference import generate  # noqa: E402
from lclm.model import DecoderLM  # noqa: E402

VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 21))
# max|lclm - transformers| / max|transformers| over the logits (float32; seen: < 1e-6).
MAX_RELATIVE_ERROR = 1e-4


def _relative_error(out, ref):
  return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def _lclm_logits(model, tokens=TOKENS):
  return np.asarray(model(jnp.asarray(tokens), position_ids=jnp.arange(tokens.shape[1])[None]))


def _torch_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _is_dt_bias(name: str) -> bool:
  return name.endswith(("dt_proj.bias", "dt_bias"))


def _perturb_torch(model, seed: int):
  """Noise on every parameter; dt biases drawn so that softplus(dt) spans ~(0.13, 1.3) and the
  recurrence matters over the batch's length."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if _is_dt_bias(name):
        p.copy_(torch.rand(p.shape, generator=generator) * 3.0 - 2.0)
      else:
        p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _perturb_lclm(model, seed: int):
  """Noise on every parameter of an lclm module (dt biases as in _perturb_torch)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  flat = []
  for path, variable in nnx.to_flat_state(state):
    value = np.asarray(variable[...])
    if path[-1] == "dt_bias":
      value = rng.uniform(-2.0, 1.0, value.shape)
    else:
      value = value + 0.1 * rng.standard_normal(value.shape)
    flat.append((path, variable.replace(value=jnp.asarray(value, variable[...].dtype))))
  nnx.update(model, nnx.from_flat_state(flat))


def _checkpoint(tmp_path_factory, name, config, seed):
  """(folder, transformers logits on TOKENS) of a perturbed tiny transformers model."""
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  _perturb_torch(model, seed)
  path = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(path)
  return path, _torch_logits(model)


@pytest.fixture(scope="module")
def mamba_checkpoint(tmp_path_factory):
  config = transformers.MambaConfig(
      vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
      conv_kernel=4, time_step_rank="auto", use_bias=True, use_conv_bias=False,
      layer_norm_epsilon=1e-4, tie_word_embeddings=True)
  return _checkpoint(tmp_path_factory, "mamba", config, seed=1)


@pytest.fixture(scope="module")
def mamba2_checkpoint(tmp_path_factory):
  config = transformers.Mamba2Config(
      vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
      head_dim=16, num_heads=4, n_groups=2, conv_kernel=4, use_bias=True, chunk_size=8,
      layer_norm_epsilon=1e-4, tie_word_embeddings=False)
  return _checkpoint(tmp_path_factory, "mamba2", config, seed=2)


@pytest.fixture(scope="module")
def jamba_checkpoint(tmp_path_factory):
  # Layers: mamba + MoE, attention + MLP, mamba + MLP, attention + MoE.
  config = transformers.JambaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
      attn_layer_period=2, attn_layer_offset=1, expert_layer_period=3, expert_layer_offset=0,
      mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, mamba_proj_bias=True,
      rms_norm_eps=1e-5, tie_word_embeddings=False)
  path, ref = _checkpoint(tmp_path_factory, "jamba", config, seed=3)
  return path, ref, lclm.hf.load_pretrained(path)


def test_mamba_logits_match_transformers(mamba_checkpoint):
  path, ref = mamba_checkpoint
  model = lclm.hf.load_pretrained(path)
  assert model.layer_pattern == ("mamba", "mamba")
  assert all(block.mlp is None for block in model.blocks) and model.tie_embeddings
  mixer = model.blocks[0].mixer
  assert mixer.dt_rank == 2 and mixer.conv_bias is None and mixer.in_proj_bias is not None
  assert _relative_error(_lclm_logits(model), ref) <= MAX_RELATIVE_ERROR


def test_mamba2_logits_match_transformers(mamba2_checkpoint):
  path, ref = mamba2_checkpoint
  model = lclm.hf.load_pretrained(path)
  assert model.layer_pattern == ("mamba2", "mamba2") and not model.tie_embeddings
  mixer = model.blocks[1].mixer
  assert (mixer.heads, mixer.n_groups, mixer.norm_eps) == (4, 2, 1e-4)
  assert _relative_error(_lclm_logits(model), ref) <= MAX_RELATIVE_ERROR


def test_jamba_logits_match_transformers(jamba_checkpoint):
  _, ref, model = jamba_checkpoint
  assert model.layer_pattern == ("mamba", "attention", "mamba", "attention")
  assert model.mlp_pattern == ("moe", "gated", "gated", "moe")
  assert model.blocks[1].mixer.rotary is None  # Jamba's attention has no positions.
  assert not model.blocks[0].mlp.normalize_top_k
  assert _relative_error(_lclm_logits(model), ref) <= MAX_RELATIVE_ERROR


def test_jamba_fused_experts_load_like_per_expert(jamba_checkpoint, tmp_path):
  """transformers 5's in-memory layout (experts.gate_up_proj [E, 2 inter, hidden],
  experts.down_proj [E, hidden, inter]) gives the same model as the per-expert files."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  path, ref, per_expert = jamba_checkpoint
  tensors = load_file(f"{path}/model.safetensors")
  fused = {}
  for layer in (0, 3):
    src = f"model.layers.{layer}.feed_forward.experts."
    take = lambda name: np.stack([tensors.pop(f"{src}{e}.{name}.weight") for e in range(4)])
    fused[src + "gate_up_proj"] = np.concatenate([take("gate_proj"), take("up_proj")], axis=1)
    fused[src + "down_proj"] = take("down_proj")
  assert not [name for name in tensors if ".experts." in name]
  files.write_checkpoint(str(tmp_path), files.read_config(path), {**tensors, **fused})
  model = lclm.hf.load_pretrained(str(tmp_path))
  for (p, a), (q, b) in zip(sorted(lclm.hf.model_params(model).items()),
                            sorted(lclm.hf.model_params(per_expert).items())):
    assert p == q
    np.testing.assert_array_equal(a, b, err_msg=str(p))


def test_mamba_layer_options_decode_like_the_full_pass():
  """The options the checkpoints need (projection biases, no conv bias, Jamba's dt/B/C
  norms) act alike in the closed-form one-token step and in the scan."""
  layer = layers.Mamba(16, d_state=4, d_conv=3, dt_rank=3, use_bias=True, use_conv_bias=False,
                       dt_bc_norm=True, dt_bc_norm_eps=1e-5, rngs=nnx.Rngs(0))
  _perturb_lclm(layer, seed=5)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 7, 16)), jnp.float32)
  full = np.asarray(layer(x))
  cache = layer.init_cache(2, 7)
  steps = []
  for t in range(7):
    y, cache = layer(x[:, t:t + 1], cache=cache)
    steps.append(np.asarray(y))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def _mamba2_model(**overrides):
  options = dict(layer_pattern=["mamba2"] * 2, mlp_pattern="none", tie_embeddings=True,
                 norm_eps=1e-5,
                 mixer_options={"mamba2": dict(head_dim=16, d_state=8, n_groups=2, d_conv=3,
                                               norm_eps=1e-5, use_conv_bias=False)})
  options.update(overrides)
  return DecoderLM(VOCAB, 32, **options, rngs=nnx.Rngs(0))


def test_mamba2_export_gives_transformers_the_same_logits(tmp_path):
  model = _mamba2_model()
  _perturb_lclm(model, seed=4)
  lclm.hf.save_pretrained(model, str(tmp_path), architecture="mamba2")
  config = lclm.hf.read_config(str(tmp_path))
  assert (config["num_heads"], config["n_groups"], config["conv_kernel"]) == (4, 2, 3)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(hf_model).__name__ == "Mamba2ForCausalLM"
  error = _relative_error(_lclm_logits(model), _torch_logits(hf_model))
  assert error <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("model_type, fields, named", [
    ("mamba", {"hidden_act": "gelu"}, "hidden_act"),
    ("mamba", {"intermediate_size": 48}, "intermediate_size"),
    ("mamba2", {"time_step_limit": [0.0, 1.0]}, "time_step_limit"),
    ("mamba2", {"norm_before_gate": True}, "norm_before_gate"),
    ("mamba2", {"num_heads": 3}, "num_heads"),
    ("jamba", {"attn_layer_period": 2, "attn_layer_offset": 2}, "attn_layer_offset"),
    ("jamba", {"sliding_window": 8}, "sliding_window"),
])
def test_unsupported_config_fields_raise_naming_them(model_type, fields, named):
  base = {
      "mamba": dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB),
      "mamba2": dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, head_dim=16,
                     num_heads=4, n_groups=2),
      "jamba": dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB,
                    num_attention_heads=4, intermediate_size=48),
  }[model_type]
  config = {"model_type": model_type, **base}
  lclm.hf.model_options(config)  # The base config itself is supported.
  with pytest.raises(UnsupportedConfigError, match=named):
    lclm.hf.model_options({**config, **fields})


@pytest.mark.parametrize("overrides, named", [
    (dict(layer_pattern=["mamba2", "attention"],
          mixer_options={"mamba2": dict(head_dim=16, d_state=8),
                         "attention": dict(num_heads=4)}), "'mamba2' mixer"),
    (dict(mlp_pattern="gated"), "mlp_pattern"),
    (dict(norm_eps=1e-6), "layer_norm_epsilon"),
    (dict(layer_options={1: {"d_state": 16}}), "share the mamba2 options"),
])
def test_mamba2_export_refuses_what_transformers_cannot_express(tmp_path, overrides, named):
  with pytest.raises(UnsupportedConfigError, match=named):
    lclm.hf.save_pretrained(_mamba2_model(**overrides), str(tmp_path), architecture="mamba2")


def test_mamba_family_is_registered():
  known = lclm.hf.architectures()
  assert {"mamba", "mamba2", "jamba"} <= set(known)
  assert known["mamba2"].export_config is mamba_family.mamba2_export_config
  assert known["mamba"].export_config is None and known["jamba"].export_config is None


@pytest.mark.parametrize("name", ["mamba2", "jamba"])
def test_greedy_generation_matches_transformers(request, name):
  """Recurrent states, the KV cache and MoE layers decode as transformers does."""
  folder = request.getfixturevalue(f"{name}_checkpoint")[0]
  peer = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  prompt = TOKENS[:, :9]
  ours = np.asarray(generate(lclm.hf.load_pretrained(folder), jnp.asarray(prompt),
                             max_new_tokens=8))
  with torch.no_grad():  # min_new_tokens: no row ends early at eos; all-ones attention mask.
    theirs = peer.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape),
                           max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           pad_token_id=0).numpy()[:, 9:]
  np.testing.assert_array_equal(ours, theirs)
