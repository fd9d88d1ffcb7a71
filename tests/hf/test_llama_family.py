"""lclm.hf against transformers: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3 (text).

Each case builds a tiny random transformers model with every parameter perturbed (norms
included), saves it, loads it with ``lclm.hf.load_pretrained`` and compares the logits on
sequences longer than the sliding windows. The peer needs torch: ``pip install -e '.[hf]'``.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity tests need torch: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers",
                                   reason="the parity tests need transformers: pip install -e '.[hf]'")

import lclm.hf  # noqa: E402  (after the skips)
from lclm.inference import generate  # noqa: E402

VOCAB, SEQ = 97, 19
# Worst relative error max|lclm - transformers| / max|transformers| allowed in float32.
RTOL = 2e-5
_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def _configs():
  t = transformers
  return {
      "llama_llama3_rope": t.LlamaConfig(**_SMALL, rope_scaling={
          "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
      "llama_yarn_bias": t.LlamaConfig(**_SMALL, attention_bias=True, rope_scaling={
          "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
      "llama_linear_tied": t.LlamaConfig(**_SMALL, tie_word_embeddings=True,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
      "mistral": t.MistralConfig(**_SMALL, sliding_window=5),
      "mixtral_sliding": t.MixtralConfig(**_SMALL, sliding_window=6, num_local_experts=4,
                                         num_experts_per_tok=2),
      "qwen2": t.Qwen2Config(**_SMALL, tie_word_embeddings=True),
      "qwen3": t.Qwen3Config(**{**_SMALL, "num_hidden_layers": 1}, head_dim=16),
      "phi3_longrope": t.Phi3Config(
          **{**_SMALL, "max_position_embeddings": 32}, original_max_position_embeddings=8,
          partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
          rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5],
                        "long_factor": [2.0, 3.0]}),
      "gemma2": t.Gemma2Config(**{**_SMALL, "num_hidden_layers": 3}, head_dim=8,
                               sliding_window=5, query_pre_attn_scalar=12,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
      "gemma3": t.Gemma3TextConfig(
          **{**_SMALL, "num_hidden_layers": 3}, head_dim=8, sliding_window=5,
          query_pre_attn_scalar=12,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"],
          rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                           "full_attention": {"rope_type": "linear", "factor": 2.0,
                                              "rope_theta": 1000.0}}),
  }


def _perturbed(config):
  torch.manual_seed(0)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokens):
  """name -> (folder, transformers logits [2, SEQ, VOCAB])."""
  out = {}
  for name, config in _configs().items():
    model = _perturbed(config)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    with torch.no_grad():
      out[name] = (folder, model(torch.tensor(tokens)).logits.numpy(), model)
  return out


def _logits(model, tokens):
  return np.asarray(model(jnp.asarray(tokens), position_ids=jnp.arange(tokens.shape[1])[None]))


def _relative_error(out, ref):
  return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", list(_configs()))
def test_logits_match_transformers(saved, tokens, name):
  folder, ref, _ = saved[name]
  model = lclm.hf.load_pretrained(folder)
  assert model.embed.embedding[...].dtype == jnp.float32
  assert _relative_error(_logits(model, tokens), ref) < RTOL


def test_greedy_generation_matches_transformers(saved, tokens):
  folder, _, peer = saved["gemma2"]  # Sliding windows, soft caps and Gemma's norms.
  model = lclm.hf.load_pretrained(folder)
  prompt = tokens[:, :7]
  ours = np.asarray(generate(model, jnp.asarray(prompt), max_new_tokens=10))
  with torch.no_grad():
    # min_new_tokens keeps eos from ending a row early; the explicit mask keeps token 0
    # (the pad id) of a prompt from being taken for padding.
    theirs = peer.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape),
                           max_new_tokens=10, do_sample=False, min_new_tokens=10,
                           pad_token_id=0).numpy()[:, 7:]
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("architecture,name", [("llama", "llama_yarn_bias"),
                                               ("mistral", "mistral"), ("qwen2", "qwen2")])
def test_export_round_trip(saved, tokens, tmp_path, architecture, name):
  model = lclm.hf.load_pretrained(saved[name][0])
  lclm.hf.save_pretrained(model, str(tmp_path), architecture=architecture)
  peer = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    theirs = peer(torch.tensor(tokens)).logits.numpy()
  assert _relative_error(theirs, _logits(model, tokens)) < RTOL


def test_export_refuses_what_the_architecture_cannot_express(saved):
  model = lclm.hf.load_pretrained(saved["gemma2"][0])
  with pytest.raises(lclm.hf.UnsupportedConfigError, match="soft cap"):
    lclm.hf.save_pretrained(model, "/nonexistent", architecture="llama")
  with pytest.raises(ValueError, match="architecture must be one of"):
    lclm.hf.save_pretrained(model, "/nonexistent", architecture="gemma2")


def test_bfloat16_loads_as_bfloat16_and_sharded_files(saved, tokens, tmp_path):
  _, ref, peer = saved["qwen3"]
  peer.to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="20KB")
  peer.to(torch.float32)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  model = lclm.hf.load_pretrained(str(tmp_path))
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  out = _logits(model, tokens)
  assert np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2)) < 3e-2
  as_float = lclm.hf.load_pretrained(str(tmp_path), dtype="float32")
  assert as_float.embed.embedding[...].dtype == jnp.float32


def _edit_config(folder, tmp_path, **changes):
  import shutil  # pylint: disable=import-outside-toplevel
  target = tmp_path / "edited"
  shutil.copytree(folder, target)
  with open(target / "config.json") as f:
    config = json.load(f)
  config.update(changes)
  with open(target / "config.json", "w") as f:
    json.dump(config, f)
  return str(target)


@pytest.mark.parametrize("field,value", [("hidden_act", "relu"), ("mlp_bias", True),
                                         ("model_type", "gpt2")])
def test_unsupported_fields_are_named(saved, tmp_path, field, value):
  folder = _edit_config(saved["llama_linear_tied"][0], tmp_path, **{field: value})
  with pytest.raises(lclm.hf.UnsupportedConfigError, match=field if field != "model_type"
                     else "gpt2"):
    lclm.hf.load_pretrained(folder)


def test_missing_and_corrupt_files(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    lclm.hf.load_pretrained(str(tmp_path))
  folder = _edit_config(saved["mistral"][0], tmp_path)
  with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="safetensors"):
    lclm.hf.load_pretrained(folder)
  os.remove(os.path.join(folder, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    lclm.hf.load_pretrained(folder)
