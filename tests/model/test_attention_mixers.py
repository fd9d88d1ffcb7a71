"""The attention mixers (attention, local_attention, global_attention) and the decoder's
shared and per-layer mixer options: window semantics, defaults, validation naming the gin
binding."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lclm.model import DecoderLM, get_mixer, registered_mixers
from pallas_kernels import masks

FEATURES = 32


def _mixer(name, **options):
  return get_mixer(name)(FEATURES, rngs=nnx.Rngs(0), dtype=jnp.float32,
                         param_dtype=jnp.float32, **options)


def _model(pattern, **options):
  return DecoderLM(48, FEATURES, layer_pattern=pattern, mlp_hidden_features=32,
                   rngs=nnx.Rngs(0), **options)


_call = nnx.jit(lambda module, x: module(x))


def test_attention_mixers_are_registered():
  assert {"attention", "local_attention", "global_attention"} <= set(registered_mixers())


@pytest.mark.parametrize("window", [1, 4])
def test_local_window_counts_the_query_itself(window):
  """window=W: the output at t depends on tokens t - W + 1 ... t and not on t - W."""
  layer = _mixer("local_attention", num_heads=4, window=window)
  assert layer.local_window_size == (window - 1, 0)
  x = jax.random.normal(jax.random.key(1), (1, 16, FEATURES))
  t = 12
  base = _call(layer, x)

  def change_at(position):
    changed = x.at[:, position].add(jax.random.normal(jax.random.key(2), (1, FEATURES)))
    return np.abs(np.asarray(_call(layer, changed) - base))[0, t].max()

  assert change_at(t - window) == 0.0
  assert change_at(t - window + 1) > 1e-4
  assert layer.kv_cache_tokens(100) == (window,) * 4


def test_local_attention_sinks_stay_visible():
  layer = _mixer("local_attention", num_heads=2, window=3, num_sink_tokens=2)
  x = jax.random.normal(jax.random.key(1), (1, 16, FEATURES))
  base = _call(layer, x)
  diff = lambda p: np.abs(np.asarray(
      _call(layer, x.at[:, p].add(1.0)) - base))[0, 15].max()
  assert diff(1) > 1e-4 and diff(2) == 0.0 and diff(12) == 0.0 and diff(13) > 1e-4
  assert layer.kv_cache_tokens(100) == (5, 5)


def test_rope_defaults_local_10k_global_1m_and_none_is_nope():
  assert _mixer("local_attention", num_heads=2, window=8).rope_theta == 10000.0
  assert _mixer("global_attention", num_heads=2).rope_theta == 1_000_000.0
  assert _mixer("global_attention", num_heads=2, rope_theta=None).rope_theta is None
  assert _mixer("local_attention", num_heads=2, window=8, rope_theta=None).rope_theta is None
  full = _mixer("global_attention", num_heads=2)
  assert full.local_window_size is None and full.mask is None
  assert full.kv_cache_tokens(77) == (77, 77)


def test_attention_per_head_windows_build_a_per_head_mask():
  layer = _mixer("attention", num_heads=4, num_kv_heads=2, per_head_windows=[None, 3, 5, 5],
                 num_sink_tokens=1)
  assert isinstance(layer.mask, masks.PerHeadMask) and layer.mask.num_heads == 4
  # kv head 0 serves a full head; kv head 1 two streaming heads: 5 recent + 1 sink.
  assert layer.kv_cache_tokens(40) == (40, 6)
  x = jax.random.normal(jax.random.key(3), (1, 12, FEATURES))
  assert np.all(np.isfinite(_call(layer, x)))


def test_attention_s2_option_is_training_only():
  layer = _mixer("attention", num_heads=4, shifted_sparse_group_size=4)
  assert layer.shifted_sparse_group_size == 4 and layer.kv_cache_tokens(30) == (30,) * 4
  global_layer = _mixer("global_attention", num_heads=4, shifted_sparse_group_size=4)
  assert global_layer.shifted_sparse_group_size == 4
  # model.eval() (what the training loop's evaluation does) reaches every layer.
  model = _model(["attention", "global_attention"], shared_mixer_options={
      "num_heads": 4, "shifted_sparse_group_size": 4})
  assert [b.mixer.deterministic for b in model.blocks] == [False, False]
  model.eval()
  assert [b.mixer.deterministic for b in model.blocks] == [True, True]


@pytest.mark.parametrize("name, options, message", [
    ("local_attention", dict(num_heads=2), "needs the option window"),
    ("local_attention", dict(num_heads=2, window=0), "window must be a positive int"),
    ("local_attention", dict(num_heads=2, window=4.0), "window must be a positive int"),
    ("local_attention", dict(num_heads=2, window=4, num_sink_tokens=-2),
     "num_sink_tokens must be a non-negative int"),
    ("local_attention", dict(window=4), "needs the option num_heads"),
    ("global_attention", dict(), "needs the option num_heads"),
    ("attention", dict(num_heads=4, per_head_windows=[None, 3]),
     r"per_head_windows has 2 entries but num_heads=4"),
    ("attention", dict(num_heads=2, per_head_windows="none"), "per_head_windows must be a list"),
    ("attention", dict(num_heads=2, per_head_windows=[None, -1]),
     "per_head_windows must be a positive int"),
    ("attention", dict(num_heads=2, num_sink_tokens=4), "num_sink_tokens=4 needs per_head_windows"),
    ("attention", dict(num_heads=4, shifted_sparse_group_size=3), "shifted_sparse_group_size=3"),
])
def test_bad_mixer_options_raise(name, options, message):
  with pytest.raises(ValueError, match=message):
    _mixer(name, **options)


# ---------------------------------------------------------------- shared and per-layer options


def test_shared_options_reach_every_mixer_that_accepts_them():
  model = _model(["local_attention", "global_attention", "local_attention"],
                 shared_mixer_options={"num_heads": 4, "num_kv_heads": 2, "window": 6},
                 mixer_options={"global_attention": {"num_kv_heads": 1}})
  mixers = [block.mixer for block in model.blocks]
  assert [m.num_heads for m in mixers] == [4, 4, 4]
  # mixer_options override shared options; window goes only where it is accepted.
  assert [m.num_kv_heads for m in mixers] == [2, 1, 2]
  assert [m.local_window_size for m in mixers] == [(5, 0), None, (5, 0)]


def test_layer_options_set_a_window_per_layer():
  model = _model(["local_attention"] * 3 + ["global_attention"],
                 shared_mixer_options={"num_heads": 2},
                 mixer_options={"local_attention": {"window": 8}},
                 layer_options={0: {"window": 2}, -2: {"window": 32, "rope_theta": None}})
  mixers = [block.mixer for block in model.blocks]
  assert [m.local_window_size for m in mixers] == [(1, 0), (7, 0), (31, 0), None]
  assert [m.rope_theta for m in mixers] == [10000.0, 10000.0, None, 1_000_000.0]


def test_gin_sets_per_layer_options_with_int_keys():
  gin.parse_config("""
    DecoderLM.layer_pattern = ["local_attention", "local_attention"]
    DecoderLM.shared_mixer_options = {"num_heads": 2}
    DecoderLM.mixer_options = {"local_attention": {"window": 4}}
    DecoderLM.layer_options = {1: {"window": 16}}
  """)
  model = DecoderLM(48, FEATURES, rngs=nnx.Rngs(0))
  assert [b.mixer.local_window_size for b in model.blocks] == [(3, 0), (15, 0)]


@pytest.mark.parametrize("overrides, message", [
    (dict(mixer_options={"local_attention": {"window": -3}}),
     r"layer 0 .*window must be a positive int.*got -3 \(window is set by "
     r"DecoderLM\.mixer_options\['local_attention'\]\['window'\]\)"),
    (dict(layer_options={2: {"window": 1.5}}),
     r"layer 2 .*window is set by DecoderLM\.layer_options\[2\]\['window'\]"),
    (dict(layer_options={1: {"window": 8}}),
     r"mixer 'global_attention' does not accept the option\(s\) \['window'\] "
     r"\(from DecoderLM\.layer_options\[1\]\)"),
    (dict(layer_options={3: {}}), r"layer_options key 3 is not a layer index of the 3-layer"),
    (dict(layer_options={0: {}, -3: {}}), "names layer 0 twice"),
    (dict(layer_options=[{}]), "layer_options must map layer indices"),
    (dict(shared_mixer_options={"num_heads": 2, "windw": 4}),
     r"shared_mixer_options sets \['windw'\], which no mixer"),
    (dict(shared_mixer_options={"num_heads": 2, "rngs": 4}), "passes itself"),
    (dict(shared_mixer_options={"num_heads": 3}),
     r"num_heads=3.*num_heads is set by DecoderLM\.shared_mixer_options\['num_heads'\]"),
])
def test_bad_hybrid_configs_name_the_binding(overrides, message):
  config = dict(shared_mixer_options={"num_heads": 2},
                mixer_options={"local_attention": {"window": 4}})
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    _model(["local_attention", "global_attention", "local_attention"], **config)


def test_per_head_windows_of_the_wrong_length_name_both_bindings():
  with pytest.raises(ValueError, match=(
      r"per_head_windows has 2 entries but num_heads=4.*"
      r"num_heads is set by DecoderLM\.shared_mixer_options\['num_heads'\]; "
      r"per_head_windows is set by DecoderLM\.mixer_options\['attention'\]"
      r"\['per_head_windows'\]")):
    _model(["attention"], shared_mixer_options={"num_heads": 4},
           mixer_options={"attention": {"per_head_windows": [None, 8]}})
