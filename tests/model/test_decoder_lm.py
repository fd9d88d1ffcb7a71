"""DecoderLM: shapes, causality, packed segments, positions, tied output, config errors."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lclm.model import DecoderLM

VOCAB, FEATURES, SEQ = 48, 32, 12
ATTENTION = {"attention": {"num_heads": 4, "num_kv_heads": 2}}


def _model(**overrides):
  config = dict(layer_pattern=["attention", "attention"], mixer_options=ATTENTION,
                short_conv_size=4, mlp_hidden_features=64)
  config.update(overrides)
  return DecoderLM(VOCAB, FEATURES, rngs=nnx.Rngs(0), **config)


@nnx.jit
def _forward(model, tokens, positions, segment_ids=None):
  return model(tokens, position_ids=positions, segment_ids=segment_ids)


def _tokens(batch=2, seq=SEQ, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB, dtype=jnp.int32)


def _positions(batch=2, seq=SEQ):
  return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def test_logits_shape_and_dtype_with_bfloat16_compute():
  model = _model(dtype="bfloat16")
  logits = _forward(model, _tokens(), _positions())
  assert logits.shape == (2, SEQ, VOCAB) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  params = nnx.state(model, nnx.Param)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  # bfloat16 compute tracks float32 compute on the same parameters.
  reference = _forward(nnx.merge(nnx.graphdef(_model()), params), _tokens(), _positions())
  assert float(jnp.max(jnp.abs(logits - reference))) < 0.15 * float(jnp.std(reference)) + 0.05


def test_future_tokens_do_not_change_earlier_logits():
  model = _model()
  tokens = _tokens()
  changed = tokens.at[:, 7].set((tokens[:, 7] + 5) % VOCAB)
  before = _forward(model, tokens, _positions())
  after = _forward(model, changed, _positions())
  np.testing.assert_allclose(after[:, :7], before[:, :7], atol=1e-6, rtol=0)
  assert float(jnp.max(jnp.abs(after[:, 7:] - before[:, 7:]))) > 1e-3


@pytest.mark.parametrize("short_conv_size", [0, 4])
def test_packed_segments_equal_separate_sequences(short_conv_size):
  model = _model(short_conv_size=short_conv_size)
  lengths = [5, 4, 3]
  tokens = _tokens(batch=1)
  segment_ids = jnp.asarray([np.repeat(np.arange(3), lengths)], jnp.int32)
  positions = jnp.asarray([np.concatenate([np.arange(n) for n in lengths])], jnp.int32)
  packed = _forward(model, tokens, positions, segment_ids)
  unpacked = _forward(model, tokens, positions)  # no segment_ids: segments see each other
  start = 0
  for n in lengths:
    alone = _forward(model, tokens[:, start:start + n], _positions(1, n))
    np.testing.assert_allclose(packed[:, start:start + n], alone, atol=2e-5, rtol=1e-5)
    if start:
      assert float(jnp.max(jnp.abs(unpacked[:, start:start + n] - alone))) > 1e-3
    start += n


def test_uniform_position_shift_is_invisible_but_positions_matter():
  model = _model()  # RoPE depends on position differences only
  tokens = _tokens()
  logits = _forward(model, tokens, _positions())
  shifted = _forward(model, tokens, _positions() + 17)
  np.testing.assert_allclose(shifted, logits, atol=1e-4, rtol=1e-4)
  reversed_positions = _forward(model, tokens, _positions()[:, ::-1])
  assert float(jnp.max(jnp.abs(reversed_positions - logits))) > 1e-3


def test_tied_output_reads_the_embedding_and_untied_does_not():
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)  # token 40 is never an input
  positions = _positions(1, 6)
  for tie in (True, False):
    model = _model(tie_embeddings=tie)
    before = _forward(model, tokens, positions)
    model.embed.embedding[...] = model.embed.embedding[...].at[40].multiply(-3.0)
    after = _forward(model, tokens, positions)
    others = np.delete(np.arange(VOCAB), 40)
    np.testing.assert_allclose(after[..., others], before[..., others], atol=1e-6, rtol=0)
    moved = float(jnp.max(jnp.abs(after[..., 40] - before[..., 40])))
    assert (moved > 1e-2) if tie else (moved == 0.0)
  untied_params = nnx.state(_model(tie_embeddings=False), nnx.Param)
  tied_params = nnx.state(_model(tie_embeddings=True), nnx.Param)
  count = lambda state: sum(leaf.size for leaf in jax.tree.leaves(state))
  assert count(untied_params) - count(tied_params) == FEATURES * VOCAB
  assert untied_params["unembed"]["kernel"].get_metadata()["out_sharding"] == ("embed", "vocab")


@pytest.mark.parametrize("overrides, message", [
    ({"layer_pattern": ["attention", "mamba9"]}, r"Unknown mixer 'mamba9'.*attention"),
    ({"layer_pattern": []}, "non-empty list"),
    ({"layer_pattern": "attention"}, "non-empty list"),
    ({"mixer_options": {"attention": {"num_heads": 3}}}, r"layer 0.*features=32.*num_heads=3"),
    ({"mixer_options": {"attention": {"num_heads": 4, "num_kv_heads": 3}}},
     r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ({"mixer_options": {}}, "needs the option num_heads"),
    ({"mixer_options": {"attention": {"num_heads": 4, "window": 8}}},
     r"does not accept the option\(s\) \['window'\]"),
    ({"mixer_options": {**ATTENTION, "mamba2": {}}}, r"names \['mamba2'\].*does not use"),
    ({"short_conv_size": -1}, "short_conv_size must be >= 0"),
    ({"mixer_options": {"attention": {"num_heads": 4, "dtype": "float16"}}},
     "passes itself"),
])
def test_bad_configs_raise_value_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _model(**overrides)


def test_bad_inputs_raise_value_errors():
  model = _model()
  with pytest.raises(ValueError, match="position_ids must be"):
    model(_tokens(), position_ids=_positions(2, SEQ - 1))
  with pytest.raises(ValueError, match="segment_ids must be"):
    model(_tokens(), position_ids=_positions(), segment_ids=jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="tokens must be integer"):
    model(jnp.zeros((2, SEQ)), position_ids=_positions())


def test_gin_configures_the_model():
  gin.parse_config("""
    DecoderLM.layer_pattern = ["attention"]
    DecoderLM.mixer_options = {"attention": {"num_heads": 2, "rope_theta": None}}
    DecoderLM.short_conv_size = 3
    DecoderLM.tie_embeddings = False
  """)
  try:
    model = DecoderLM(VOCAB, FEATURES, rngs=nnx.Rngs(0))
  finally:
    gin.clear_config()
  assert len(model.blocks) == 1 and model.unembed is not None
  assert model.blocks[0].mixer.num_heads == 2 and model.blocks[0].mixer.rope_theta is None
  assert model.blocks[0].short_conv.kernel.shape == (3, FEATURES)
