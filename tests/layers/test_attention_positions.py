"""Position options of the attention layer, checked against float64 NumPy by hand: RoPE
scaling (with the length-dependent types read from the positions), YaRN's attention scaling,
partial rotary, both layouts, per-head bases (HARPE), fractional positions (E²-LLM), the
Self-Extend and LM-Infinite modes, validation; and DecoderLM.position_options with the gin
files of configs/positions/."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_layers as ref
from experiments import train as train_main
from layers import Attention
from layers import position_extensions as pe
from layers.rope import rope_frequencies
from lclm.model import DecoderLM
from pallas_kernels._common.testing import assert_close

FEATURES, HEADS, HEAD_DIM = 32, 4, 16


def _layer(num_kv_heads=None, **options):
  return Attention(FEATURES, HEADS, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM,
                   rngs=nnx.Rngs(0), **options)


def _x(batch=2, seq=24, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, seq, FEATURES), jnp.float32)


def _rope64(x, positions, inv_freq, layout="half", scaling=1.0):
  """x [b, t, h, d] rotated in float64: inv_freq [pairs] or [h, pairs]; the coordinates past
  2 * pairs pass through; cos and sin multiplied by ``scaling``."""
  x = ref.f64(x)
  inv_freq = ref.f64(inv_freq)
  inv_freq = np.broadcast_to(inv_freq, (x.shape[2], inv_freq.shape[-1]))
  rotary = 2 * inv_freq.shape[-1]
  first, second = ref.rope_pairs(rotary, layout)
  angles = ref.f64(positions)[:, :, None, None] * inv_freq[None, None]  # [b, t, h, pairs]
  cos, sin = np.cos(angles) * scaling, np.sin(angles) * scaling
  out = x.copy()
  a, b = x[..., first], x[..., second]
  out[..., first] = a * cos - b * sin
  out[..., second] = b * cos + a * sin
  return out


def _by_hand(layer, x, positions, q_freq, k_freq=None, *, layout="half", scaling=1.0):
  """The layer's output with the given frequencies, computed in float64 NumPy."""
  k_freq = q_freq if k_freq is None else k_freq
  x64 = ref.f64(x)
  q = np.einsum("btf,fhd->bthd", x64, ref.f64(layer.q_proj.kernel[...]))
  k = np.einsum("btf,fhd->bthd", x64, ref.f64(layer.k_proj.kernel[...]))
  v = np.einsum("btf,fhd->bthd", x64, ref.f64(layer.v_proj.kernel[...]))
  positions = np.broadcast_to(np.asarray(positions), x.shape[:2])
  q = _rope64(q, positions, q_freq, layout, scaling)
  k = _rope64(k, positions, k_freq, layout, scaling)
  t = x.shape[1]
  visible = np.broadcast_to(np.tril(np.ones((t, t), bool)), (layer.num_heads, t, t))
  out = ref.masked_attention(q, k, v, visible)
  return np.einsum("bthd,hdf->btf", out, ref.f64(layer.o_proj.kernel[...]))


def _positions(batch, seq, offset=0):
  return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32) + offset, (batch, seq))


# ----------------------------------------------------------------------------- scaling


SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16, "factor": 4.0,
                 "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0],
                 "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("offset", [0, 30])
def test_rope_scaling_matches_hand_computation(name, offset):
  """The length-dependent types read seq_len = max(position_ids) + 1: 24 tokens at offset 0
  stay beyond the original 16; both offsets are checked against the frequencies of that
  length, with the method's attention scaling on cos and sin of q and k."""
  scaling = SCALINGS[name]
  layer = _layer(rope_scaling=scaling)
  x, pos = _x(), _positions(2, 24, offset)
  out = jax.jit(lambda x, pos: layer(x, position_ids=pos))(x, pos)
  inv_freq, attention = rope_frequencies(HEAD_DIM, 10000.0, scaling=scaling,
                                         seq_len=24 + offset)
  assert_close("attention_output", jnp.float32, out,
               _by_hand(layer, x, pos, inv_freq, scaling=attention))
  if name == "yarn":
    assert attention > 1.1  # 0.1 ln 8 + 1: the temperature is really applied.


def test_dynamic_ntk_is_plain_rope_within_the_original_length():
  layer = _layer(rope_scaling=SCALINGS["dynamic"])
  plain = _layer()
  x, pos = _x(seq=16), _positions(2, 16)
  np.testing.assert_allclose(layer(x, position_ids=pos), plain(x, position_ids=pos),
                             rtol=1e-6, atol=1e-6)
  longer = _positions(2, 16, offset=8)  # max position 23 >= 16: the base grows.
  assert not np.allclose(layer(x, position_ids=longer), plain(x, position_ids=longer),
                         atol=1e-4)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_partial_rotary_and_layouts(layout, partial):
  layer = _layer(num_kv_heads=2, rope_layout=layout, partial_rotary_factor=partial,
                 rope_scaling=SCALINGS["yarn"])
  x, pos = _x(), _positions(2, 24, 5)
  inv_freq, attention = rope_frequencies(HEAD_DIM, 10000.0, scaling=SCALINGS["yarn"],
                                         partial_rotary_factor=partial)
  assert inv_freq.shape == (int(HEAD_DIM * partial) // 2,)
  assert_close("attention_output", jnp.float32, layer(x, position_ids=pos),
               _by_hand(layer, x, pos, inv_freq, layout=layout, scaling=attention))


def test_per_head_bases_harpe():
  thetas = [100.0, 100.0, 1e4, 1e4]  # GQA: each pair of query heads shares a kv head.
  layer = _layer(num_kv_heads=2, rope_theta=thetas)
  x, pos = _x(), _positions(2, 24, 3)
  per_head = np.stack([np.asarray(rope_frequencies(HEAD_DIM, t).inv_freq) for t in thetas])
  assert_close("attention_output", jnp.float32, layer(x, position_ids=pos),
               _by_hand(layer, x, pos, per_head, per_head[::2]))
  shared = _layer(num_kv_heads=2)
  assert not np.allclose(layer(x, position_ids=pos), shared(x, position_ids=pos), atol=1e-3)


def test_fractional_positions_equal_position_interpolation():
  """E²-LLM's positions i / g with plain RoPE are Position Interpolation by g."""
  g = 4.0
  interpolated = _layer(rope_scaling={"rope_type": "linear", "factor": g})
  plain = _layer()
  x, pos = _x(), _positions(2, 24, 2)
  np.testing.assert_allclose(plain(x, position_ids=pos.astype(jnp.float32) / g),
                             interpolated(x, position_ids=pos), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- extensions


def _projected(layer, x):
  return layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)


@pytest.mark.parametrize("num_kv_heads", [pytest.param(4, marks=pytest.mark.slow), 2])
def test_self_extend_mode_matches_reference_with_gradients(num_kv_heads):
  extension = {"method": "self_extend", "group_size": 3, "window": 6}
  layer = _layer(num_kv_heads=num_kv_heads, position_extension=extension,
                 rope_scaling=SCALINGS["yarn"], implementation="xla")
  x, pos = _x(seq=40), _positions(2, 40, 1)
  freqs = rope_frequencies(HEAD_DIM, 10000.0, scaling=SCALINGS["yarn"])

  def by_reference(x):
    q, k, v = _projected(layer, x)
    out = pe.self_extend_reference(q, k, v, position_ids=pos, freqs=freqs, group_size=3,
                                   window=6)
    return layer.o_proj(out)

  assert_close("attention_output", jnp.float32, layer(x, position_ids=pos), by_reference(x))
  loss = lambda fn: lambda x: jnp.sum(jnp.sin(fn(x)))  # noqa: E731
  g = jax.grad(loss(lambda x: layer(x, position_ids=pos)))(x)
  g_ref = jax.grad(loss(by_reference))(x)
  assert_close("dq", jnp.float32, g, g_ref, name="dx")


def test_lm_infinite_mode_matches_reference_and_caches_its_lambda():
  extension = {"method": "lm_infinite", "local_window": 8, "max_distance": 8, "num_global": 2}
  layer = _layer(position_extension=extension, implementation="xla")
  x, pos = _x(seq=40), _positions(2, 40)
  q, k, v = _projected(layer, x)
  want = layer.o_proj(pe.lm_infinite_reference(
      q, k, v, position_ids=pos, freqs=rope_frequencies(HEAD_DIM), num_global=2,
      local_window=8, max_distance=8))
  assert_close("attention_output", jnp.float32, layer(x, position_ids=pos), want)
  assert layer.kv_cache_tokens(40) == (10,) * HEADS  # 2 sinks + the window of 8.
  # Without sinks it is the window alone (one pass).
  window_only = _layer(position_extension={"method": "lm_infinite", "local_window": 8,
                                           "max_distance": 8})
  plain_window = _layer(local_window_size=(7, 0))
  np.testing.assert_allclose(window_only(x, position_ids=pos),
                             plain_window(x, position_ids=pos), rtol=1e-6, atol=1e-6)


def test_self_extend_with_packed_segments_equals_separate_rows():
  layer = _layer(position_extension={"method": "self_extend", "group_size": 2, "window": 4})
  x = _x(batch=1, seq=30)
  seg = jnp.asarray([[1] * 17 + [2] * 13], jnp.int32)
  pos = jnp.asarray([list(range(17)) + list(range(13))], jnp.int32)
  packed = layer(x, position_ids=pos, segment_ids=seg)
  first = layer(x[:, :17], position_ids=pos[:, :17])
  second = layer(x[:, 17:], position_ids=pos[:, 17:])
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), rtol=1e-5,
                             atol=1e-5)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("options, message", [
    (dict(rope_theta=None, rope_scaling={"rope_type": "linear", "factor": 2.0}), "need RoPE"),
    (dict(rope_theta=None, partial_rotary_factor=0.5), "need RoPE"),
    (dict(rope_scaling={"rope_type": "nope"}), "rope_type"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(rope_scaling=[("rope_type", "linear")]), "rope_scaling"),
    (dict(rope_layout="neox"), "rope_layout"),
    (dict(partial_rotary_factor=0.1), "rotary_dim"),
    (dict(rope_theta=[1e4, 1e4]), "one base per query head"),
    (dict(rope_theta=[1e4, 2e4, 1e4, 1e4], num_kv_heads=2), "share one rope_theta"),
    (dict(rope_theta=[1e4, -1.0, 1e4, 1e4]), "positive"),
    (dict(position_extension={"method": "yarn"}), "method"),
    (dict(position_extension={"method": "self_extend", "group_size": 2}), "missing"),
    (dict(position_extension={"method": "self_extend", "group_size": 0, "window": 4}),
     "group_size"),
    (dict(position_extension={"method": "self_extend", "group_size": 2, "window": 4},
          local_window_size=8), "local_window_size"),
    (dict(position_extension={"method": "lm_infinite", "local_window": 8, "max_distance": 8},
          is_causal=False), "is_causal"),
])
def test_bad_position_options_raise_at_construction(options, message):
  with pytest.raises(ValueError, match=message):
    _layer(**options)


def test_self_extend_needs_integer_positions():
  layer = _layer(position_extension={"method": "self_extend", "group_size": 2, "window": 4})
  with pytest.raises(ValueError, match="integer position_ids"):
    layer(_x(), position_ids=_positions(2, 24).astype(jnp.float32))


# ----------------------------------------------------------------------------- the model


def _model(**kwargs):
  defaults = dict(features=FEATURES, layer_pattern=["attention", "global_attention"],
                  shared_mixer_options={"num_heads": HEADS})
  defaults.update(kwargs)
  return DecoderLM(vocab_size=64, rngs=nnx.Rngs(0), **defaults)


def test_position_options_reach_every_attention_layer_and_yield_to_mixer_options():
  yarn = SCALINGS["yarn"]
  model = _model(position_options={"rope_theta": 500.0, "rope_scaling": yarn},
                 mixer_options={"global_attention": {"rope_theta": 1e6}})
  first, second = (block.mixer for block in model.blocks)
  assert first.rope_theta == 500.0 and second.rope_theta == 1e6
  assert first.rotary.rope_type == second.rotary.rope_type == "yarn"
  # A NoPE layer drops the scaling of the positions file instead of failing.
  nope = _model(position_options={"rope_theta": 1e4, "rope_scaling": yarn},
                mixer_options={"global_attention": {"rope_theta": None}})
  assert nope.blocks[1].mixer.rotary is None
  assert nope.blocks[0].mixer.rotary.rope_type == "yarn"


@pytest.mark.parametrize("kwargs, message", [
    (dict(position_options={"rope_thetta": 1.0}), "not position options"),
    (dict(position_options={"rope_theta": 1e4},
          shared_mixer_options={"num_heads": HEADS, "rope_theta": 1e4}), "set both"),
    (dict(position_options=[("rope_theta", 1e4)]), "position_options"),
    (dict(position_options={"rope_scaling": {"rope_type": "yarn"}}),
     r"original_max_position_embeddings.*rope_scaling is set by "
     r"DecoderLM.position_options\['rope_scaling'\]"),
])
def test_bad_position_options_of_the_model(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _model(**kwargs)


POSITION_FILES = {"rope": "default", "nope": None, "pi": "linear", "ntk": "ntk",
                  "dynamic_ntk": "dynamic", "yarn": "yarn", "longrope": "longrope",
                  "llama3": "llama3", "harpe": "default", "self_extend": "default",
                  "lm_infinite": "default"}


@pytest.mark.parametrize("name", sorted(POSITION_FILES))
def test_position_files_configure_the_quickstart_model(name):
  train_main.parse_gin(["configs/experiments/quickstart.gin", f"configs/positions/{name}.gin"],
                       [])
  model = DecoderLM(vocab_size=256, rngs=nnx.Rngs(0))
  layer = model.blocks[0].mixer
  if POSITION_FILES[name] is None:
    assert layer.rotary is None
  else:
    assert layer.rotary.rope_type == POSITION_FILES[name]
  if name == "harpe":
    assert len(set(layer.rotary.thetas)) == HEADS
  if name in ("self_extend", "lm_infinite"):
    assert layer.position_extension.method == name
  tokens = jnp.zeros((1, 128), jnp.int32)  # 2x the training length.
  logits = model(tokens, position_ids=_positions(1, 128))
  assert logits.shape == (1, 128, 256) and bool(jnp.all(jnp.isfinite(logits)))
