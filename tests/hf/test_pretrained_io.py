"""lclm.hf without the peer: gin bindings of a checkpoint, sharded loading (8 fake devices)."""

from __future__ import annotations

import gin
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lclm.hf
from lclm.model import DecoderLM
from tests.conftest import run_on_fake_devices

LLAMA_LIKE = dict(vocab_size=61, features=32, layer_pattern=["attention"] * 2,
                  shared_mixer_options={"num_heads": 4, "num_kv_heads": 2},
                  position_options={"rope_theta": 5000.0, "max_position_embeddings": 128},
                  mlp_hidden_features=40, tie_embeddings=False)


def test_gin_config_rebuilds_the_checkpoint_model(tmp_path):
  model = DecoderLM(**LLAMA_LIKE, rngs=nnx.Rngs(1))
  lclm.hf.save_pretrained(model, str(tmp_path), architecture="llama")
  options = lclm.hf.model_options(lclm.hf.read_config(str(tmp_path)))
  gin.clear_config()
  try:
    gin.parse_config(lclm.hf.gin_config(options))
    assert gin.query_parameter("%HF_VOCAB_SIZE") == 61
    rebuilt = DecoderLM(vocab_size=61, rngs=nnx.Rngs(2))
  finally:
    gin.clear_config()
  loaded = lclm.hf.load_pretrained(str(tmp_path))
  assert nnx.graphdef(rebuilt) == nnx.graphdef(loaded)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 11)))
  positions = jnp.arange(11)[None]
  np.testing.assert_allclose(loaded(tokens, position_ids=positions),
                             model(tokens, position_ids=positions), atol=1e-5)


def test_sharded_load_equals_one_device(tmp_path):
  run_on_fake_devices(f"""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import lclm.hf, lclm.sharding as sharding
    from lclm.model import DecoderLM
    model = DecoderLM(**{LLAMA_LIKE!r}, rngs=nnx.Rngs(1))
    lclm.hf.save_pretrained(model, {str(tmp_path)!r}, architecture="llama")
    mesh = sharding.make_mesh(data=2, tensor=4)
    sharded = lclm.hf.load_pretrained({str(tmp_path)!r}, mesh=mesh)
    kernel = sharded.blocks[0].mixer.q_proj.kernel[...]
    assert kernel.sharding.spec[1] == "tensor", kernel.sharding
    assert len(kernel.sharding.device_set) == 8
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 11)))
    positions = jnp.arange(11)[None]
    np.testing.assert_allclose(sharded(tokens, position_ids=positions),
                               model(tokens, position_ids=positions), atol=1e-5)
  """)
