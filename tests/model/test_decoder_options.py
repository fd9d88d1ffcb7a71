"""DecoderLM and Attention options the pretrained checkpoints need: mixer-only blocks, Gemma's
norms and scalings, biases, the attention scale. (Their parity with transformers is in
tests/hf/.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lclm.model  # noqa: F401  (registers the mixers)
from layers import Attention, RMSNorm
from lclm.model import DecoderLM

ATTENTION = dict(shared_mixer_options={"num_heads": 2}, layer_pattern=["attention"] * 2)


def _model(**options):
  options = {**ATTENTION, **options}
  return DecoderLM(37, 16, mlp_hidden_features=24, rngs=nnx.Rngs(0), **options)


def _param_names(model):
  return {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _logits(model, tokens):
  return model(tokens, position_ids=jnp.arange(tokens.shape[1])[None])


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 37, (2, 9)))


def test_mlp_pattern_none_and_per_layer():
  names = _param_names(_model(mlp_pattern=["none", "gated"]))
  assert not any(n.startswith("blocks.0.mlp") for n in names)
  assert "blocks.1.mlp.gate.kernel" in names and "blocks.1.mlp_norm.scale" in names
  assert np.isfinite(_logits(_model(mlp_pattern="none"), TOKENS)).all()


@pytest.mark.parametrize("options,match", [
    (dict(mlp_pattern=["gated"]), "one entry per layer"),
    (dict(mlp_pattern="dense"), "mlp_pattern"),
    (dict(mlp_pattern="moe"), "needs moe_options"),
    (dict(moe_options={"num_experts": 2}), "no 'moe' layer"),
    (dict(final_logits_soft_cap=0.0), "final_logits_soft_cap"),
    (dict(embedding_multiplier=-1.0), "embedding_multiplier"),
])
def test_bad_options(options, match):
  with pytest.raises(ValueError, match=match):
    _model(**options)


def test_gemma_norm_offset_is_a_reparameterisation():
  x = jax.random.normal(jax.random.key(0), (3, 8))
  plain, gemma = RMSNorm(8), RMSNorm(8, scale_offset=1.0)
  np.testing.assert_array_equal(gemma.scale[...], np.zeros(8))
  scale = jax.random.normal(jax.random.key(1), (8,))
  plain.scale[...] = scale
  gemma.scale[...] = scale - 1.0
  np.testing.assert_allclose(gemma(x), plain(x), atol=1e-6)


def test_post_norms_multiplier_and_soft_cap():
  base = _model()
  names = _param_names(_model(post_norms=True))
  assert {"blocks.0.post_mixer_norm.scale", "blocks.0.post_mlp_norm.scale"} <= names
  capped = _model(final_logits_soft_cap=0.5)
  logits = _logits(capped, TOKENS)
  np.testing.assert_allclose(logits, 0.5 * jnp.tanh(_logits(base, TOKENS) / 0.5), atol=1e-6)
  # The multiplier scales the residual stream's input; RMSNorm makes the first block's
  # mixer input blind to it, but the residual sum is not.
  assert not np.allclose(_logits(_model(embedding_multiplier=3.0), TOKENS),
                         _logits(base, TOKENS), atol=1e-3)


def test_attention_scale_and_biases():
  x = jax.random.normal(jax.random.key(2), (2, 7, 16))
  scaled = Attention(16, 2, attention_scale=0.1, qkv_bias=True, output_bias=True,
                     rngs=nnx.Rngs(0))
  plain = Attention(16, 2, qkv_bias=True, output_bias=True, rngs=nnx.Rngs(0))
  assert scaled.q_proj.bias[...].shape == (2, 8) and scaled.o_proj.bias[...].shape == (16,)
  for proj in ("q_proj", "k_proj", "v_proj"):
    getattr(plain, proj).bias[...] = jax.random.normal(jax.random.key(3), (2, 8))
    getattr(scaled, proj).bias[...] = getattr(plain, proj).bias[...]
  factor = 0.1 * 8 ** 0.5  # The same logits by scaling the query projection instead.
  plain.q_proj.kernel[...] = plain.q_proj.kernel[...] * factor
  plain.q_proj.bias[...] = plain.q_proj.bias[...] * factor
  np.testing.assert_allclose(scaled(x), plain(x), atol=1e-5)
  with pytest.raises(ValueError, match="attention_scale"):
    Attention(16, 2, attention_scale=0, rngs=nnx.Rngs(0))
