"""KV-cache size of layer patterns, against hand-computed byte counts."""

import gin
import jax.numpy as jnp
import pytest
from flax import nnx

from lclm.model import (DecoderLM, kv_cache_size, kv_cache_size_for, register_mixer,
                        unregister_mixer)

GEMMA = dict(features=64, layer_pattern=["local_attention"] * 5 + ["global_attention"],
             shared_mixer_options={"num_heads": 4, "num_kv_heads": 2},
             mixer_options={"local_attention": {"window": 1024}})


def test_gemma3_five_local_to_one_global_at_32k():
  size = kv_cache_size_for(seq_len=32768, dtype="bfloat16", **GEMMA)
  # head_dim 64 / 4 = 16; one token of K and V in 2 kv heads: 2 * 2 * 16 * 2 bytes = 128.
  per_token = 2 * 2 * 16 * 2
  assert [layer.bytes_per_token for layer in size.layers] == [per_token] * 6
  assert [layer.cached_tokens for layer in size.layers] == [(1024, 1024)] * 5 + [(32768, 32768)]
  assert [layer.bytes for layer in size.layers] == [1024 * per_token] * 5 + [32768 * per_token]
  assert [layer.is_global for layer in size.layers] == [False] * 5 + [True]
  assert size.total_bytes == 5 * 131072 + 4194304 == 4849664
  assert size.full_attention_bytes == 6 * 4194304
  assert size.fraction_of_full_attention == pytest.approx(4849664 / 25165824)  # ~0.19
  assert size.bytes_per_token == pytest.approx(4849664 / 32768)
  assert "global_attention" in size.table() and "4,849,664" in size.table()


def test_short_sequences_cache_everything_and_batch_and_dtype_scale():
  short = kv_cache_size_for(seq_len=1000, dtype="bfloat16", **GEMMA)
  assert short.total_bytes == short.full_attention_bytes == 6 * 1000 * 128
  wide = kv_cache_size_for(seq_len=1000, dtype="float32", batch_size=3, **GEMMA)
  assert wide.total_bytes == 2 * 3 * short.total_bytes


def test_sinks_per_head_windows_and_gqa():
  size = kv_cache_size_for(
      features=64, layer_pattern=["local_attention", "attention"], seq_len=500,
      dtype="float32", shared_mixer_options={"num_heads": 4, "num_kv_heads": 2},
      mixer_options={"local_attention": {"window": 64, "num_sink_tokens": 4},
                     "attention": {"per_head_windows": [None, 8, 16, 32], "num_sink_tokens": 2}})
  local, duo = size.layers
  assert local.cached_tokens == (68, 68)
  # kv head 0 serves a full head and an 8-token head; kv head 1 the 16- and 32-token heads.
  assert duo.cached_tokens == (500, 34)
  per_kv_head_token = 2 * 16 * 4  # K and V, head_dim 16, float32
  assert local.bytes == 2 * 68 * per_kv_head_token
  assert duo.bytes == (500 + 34) * per_kv_head_token
  assert size.total_bytes == local.bytes + duo.bytes


def test_built_model_default_dtype_and_mixers_without_cache():
  @register_mixer("test_identity_mixer")
  def identity(features, *, rngs, dtype, param_dtype):
    del features, rngs, dtype, param_dtype
    return nnx.Module()

  try:
    model = DecoderLM(16, 32, layer_pattern=["test_identity_mixer", "global_attention"],
                      shared_mixer_options={"num_heads": 2}, dtype="bfloat16",
                      rngs=nnx.Rngs(0))
    size = kv_cache_size(model, 10)
  finally:
    unregister_mixer("test_identity_mixer")
  assert size.dtype == "bfloat16"
  assert not size.layers[0].has_kv_cache and size.layers[0].bytes == 0
  assert size.layers[1].bytes == 10 * 2 * 2 * 16 * 2 == size.total_bytes


def test_from_gin_bindings():
  gin.parse_config("""
    DecoderLM.features = 64
    DecoderLM.layer_pattern = ["local_attention", "global_attention"]
    DecoderLM.shared_mixer_options = {"num_heads": 4}
    DecoderLM.mixer_options = {"local_attention": {"window": 16}}
  """)
  size = kv_cache_size_for(seq_len=256, dtype=jnp.bfloat16)
  per_token = 2 * 4 * 16 * 2
  assert [layer.bytes for layer in size.layers] == [16 * per_token, 256 * per_token]


def test_bad_arguments():
  with pytest.raises(ValueError, match="seq_len must be an int"):
    kv_cache_size_for(seq_len=-1, dtype="bfloat16", **GEMMA)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    kv_cache_size_for(seq_len=8, batch_size=0, **GEMMA)
