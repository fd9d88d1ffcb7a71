"""RoPE frequency scaling (PI, NTK, dynamic NTK, YaRN, LongRoPE, Llama 3.1) against
hand-computed values of the published formulas (as implemented in Hugging Face's
``modeling_rope_utils``), partial rotary, validation and the gin files.

Most cases use head_dim 8 and theta 10 000, whose plain inverse frequencies are the round
numbers theta ** (-2i / 8) = 10 ** -i = [1, 0.1, 0.01, 0.001]; the expected values below are
written from the formulas with plain arithmetic, never from the code under test.
"""

import math
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_layers as ref
from layers import rope
from layers.rope import apply_rope, rope_frequencies

PLAIN_8 = [1.0, 0.1, 0.01, 0.001]
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "positions"


def _check(result, inv_freq, attention_scaling=1.0, rtol=1e-6):
  got_inv, got_scaling = result  # Unpacks as a pair.
  assert got_inv.dtype == jnp.float32 and got_inv.shape == (len(inv_freq),)
  assert isinstance(got_scaling, float)
  np.testing.assert_allclose(np.asarray(got_inv, np.float64), inv_freq, rtol=rtol)
  np.testing.assert_allclose(got_scaling, attention_scaling, rtol=1e-12)


# Plain, "default", old positional calls and partial rotary.


def test_plain_and_default_and_positional_theta():
  _check(rope_frequencies(8), PLAIN_8)
  _check(rope_frequencies(8, scaling={"rope_type": "default"}), PLAIN_8)
  _check(rope_frequencies(8, 10000.0), PLAIN_8)  # Old call sites: theta positional.
  # rope_parameters style (transformers 5) carries rope_theta; it must agree.
  _check(rope_frequencies(8, theta=500.0, scaling={"rope_type": "default", "rope_theta": 500.0}),
         [1.0, 500 ** -0.25, 500 ** -0.5, 500 ** -0.75])


def test_partial_rotary_exponents_use_the_rotary_dim():
  # head_dim 16 at 0.5 rotates 8 coordinates: theta ** (-2i / 8), not (-2i / 16).
  _check(rope_frequencies(16, partial_rotary_factor=0.5), PLAIN_8)
  _check(rope_frequencies(16, partial_rotary_factor=0.25), [1.0, 0.01])
  # int() truncation as in Hugging Face: int(20 * 0.3) = 6 -> 3 pairs of 10000 ** (-2i / 6).
  _check(rope_frequencies(20, partial_rotary_factor=0.3), [1.0, 10 ** (-4 / 3), 10 ** (-8 / 3)])
  # Scaling composes with partial rotary (linear: every frequency / factor).
  _check(rope_frequencies(16, partial_rotary_factor=0.5,
                          scaling={"rope_type": "linear", "factor": 2.0}),
         [0.5, 0.05, 0.005, 0.0005])


# Position Interpolation and static NTK.


def test_linear_divides_every_frequency():
  _check(rope_frequencies(8, scaling={"rope_type": "linear", "factor": 4.0}),
         [0.25, 0.025, 0.0025, 0.00025])
  # "type" is the older alias of "rope_type".
  _check(rope_frequencies(8, scaling={"type": "linear", "factor": 4}),
         [0.25, 0.025, 0.0025, 0.00025])


def test_ntk_raises_the_base():
  # theta' = 1e4 * 4 ** (8 / 6): inv_freq_i = 10 ** -i * 4 ** (-i / 3). The slowest pair is
  # exactly divided by the factor (i / 3 = 1), the fastest kept.
  _check(rope_frequencies(8, scaling={"rope_type": "ntk", "factor": 4.0}),
         [1.0, 0.06299605249474366, 0.003968502629920499, 0.00025])
  assert math.isclose(0.1 * 4 ** (-1 / 3), 0.06299605249474366, rel_tol=1e-15)


# Dynamic NTK: depends on seq_len against max_position_embeddings.


@pytest.mark.parametrize("seq_len", [None, 1, 32, 64])
def test_dynamic_is_plain_up_to_the_original_length(seq_len):
  scaling = {"rope_type": "dynamic", "factor": 2.0}
  _check(rope_frequencies(8, scaling=scaling, max_position_embeddings=64, seq_len=seq_len),
         PLAIN_8)


@pytest.mark.parametrize("seq_len, ratio", [(96, 2.0), (128, 3.0), (65, 2.0 * 65 / 64 - 1)])
def test_dynamic_beyond_the_original_length(seq_len, ratio):
  # base = 1e4 * ratio ** (8 / 6) with ratio = 2 * seq_len / 64 - (2 - 1), so
  # inv_freq_i = 10 ** -i * ratio ** (-i / 3).
  expected = {96: [1.0, 0.07937005259840998, 0.006299605249474366, 0.0005],
              128: [1.0, 0.06933612743506348, 0.004807498567691362, 1 / 3000]}
  values = expected.get(seq_len, [10.0 ** -i * ratio ** (-i / 3) for i in range(4)])
  scaling = {"rope_type": "dynamic", "factor": 2.0}
  _check(rope_frequencies(8, scaling=scaling, max_position_embeddings=64, seq_len=seq_len),
         values)
  # The original length may come from the dict instead (the argument wins where both are).
  _check(rope_frequencies(8, scaling={**scaling, "original_max_position_embeddings": 64},
                          seq_len=seq_len), values)
  _check(rope_frequencies(8, scaling={**scaling, "original_max_position_embeddings": 10},
                          max_position_embeddings=64, seq_len=seq_len), values)


def test_dynamic_with_a_traced_seq_len():
  scaling = {"rope_type": "dynamic", "factor": 2.0}
  fn = jax.jit(lambda n: rope_frequencies(8, scaling=scaling, max_position_embeddings=64,
                                          seq_len=n).inv_freq)
  np.testing.assert_allclose(fn(jnp.int32(128)), [1.0, 0.06933612743506348,
                                                   0.004807498567691362, 1 / 3000], rtol=2e-6)
  np.testing.assert_allclose(fn(jnp.int32(40)), PLAIN_8, rtol=2e-6)


# YaRN.


def test_yarn_hand_computed():
  # With d = 8 and theta = 1e4 the correction dimension d ln(L / (2 pi r)) / (2 ln theta) is
  # log10(L / (2 pi r)). L = 64: beta_fast 32 -> log10(0.318) = -0.497 -> floor -1 -> 0;
  # beta_slow 1 -> log10(10.19) = 1.008 -> ceil 2. Ramp (i - 0) / 2 = [0, .5, 1, 1]:
  # inv = plain * (1 - ramp) + plain / 4 * ramp.
  scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
  expected = [1.0, 0.1 * 0.5 + 0.025 * 0.5, 0.0025, 0.00025]
  attention = 0.1 * math.log(4.0) + 1.0  # 1.1386294361...
  _check(rope_frequencies(8, scaling=scaling), expected, attention)
  # Without the original length in the dict, max_position_embeddings is the original length.
  _check(rope_frequencies(8, scaling={"rope_type": "yarn", "factor": 4.0},
                          max_position_embeddings=64), expected, attention)
  # Without factor: max_position_embeddings / original_max_position_embeddings = 256 / 64.
  _check(rope_frequencies(8, scaling={"rope_type": "yarn",
                                      "original_max_position_embeddings": 64},
                          max_position_embeddings=256), expected, attention)
  # An explicit factor wins over that ratio (current transformers).
  _check(rope_frequencies(8, scaling=scaling, max_position_embeddings=64), expected, attention)


def test_yarn_head_dim_16_ramp():
  # d = 16: correction dim = 2 log10(64 / (2 pi r)): beta 32 -> -0.994 -> 0; beta 1 -> 2.016
  # -> 3. Ramp i / 3 = [0, 1/3, 2/3, 1, 1, ...]; plain_i = 10 ** (-i / 2).
  scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
  expected = ([1.0, 10 ** -0.5 * (2 / 3 + 1 / 12), 0.1 * (1 / 3 + 2 / 12)]
              + [10 ** (-i / 2) / 4 for i in range(3, 8)])
  _check(rope_frequencies(16, scaling=scaling), expected, 1.1386294361119891)


def test_yarn_options():
  base = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
  # truncate False (gpt-oss): low = max(-0.497, 0) = 0, high = 1.00800010562577;
  # ramp = [0, 1 / 1.008, 1, 1].
  r = 1 / 1.0080001056257721
  _check(rope_frequencies(8, scaling={**base, "truncate": False}),
         [1.0, 0.1 * (1 - r) + 0.025 * r, 0.0025, 0.00025], 1.138629436111989)
  # beta_fast 16, beta_slow 2: log10(64 / (32 pi)) = -0.196 -> 0, log10(64 / (4 pi)) = 0.707 -> 1.
  _check(rope_frequencies(8, scaling={**base, "beta_fast": 16, "beta_slow": 2}),
         [1.0, 0.025, 0.0025, 0.00025], 1.138629436111989)
  # DeepSeek: (0.1 * mscale * ln 4 + 1) / (0.1 * mscale_all_dim * ln 4 + 1).
  deepseek = (0.1 * 1.0 * math.log(4) + 1) / (0.1 * 0.5 * math.log(4) + 1)
  assert math.isclose(deepseek, 1.0648216253695715, rel_tol=1e-15)
  _check(rope_frequencies(8, scaling={**base, "mscale": 1.0, "mscale_all_dim": 0.5}),
         [1.0, 0.0625, 0.0025, 0.00025], deepseek)
  # Equal mscales (DeepSeek-V3's 1.0 / 1.0) cancel; mscale alone is ignored, as upstream.
  _check(rope_frequencies(8, scaling={**base, "mscale": 1.0, "mscale_all_dim": 1.0}),
         [1.0, 0.0625, 0.0025, 0.00025], 1.0)
  _check(rope_frequencies(8, scaling={**base, "mscale": 0.707}),
         [1.0, 0.0625, 0.0025, 0.00025], 1.138629436111989)
  # attention_factor overrides all of it; a factor <= 1 has no temperature.
  _check(rope_frequencies(8, scaling={**base, "attention_factor": 1.5}),
         [1.0, 0.0625, 0.0025, 0.00025], 1.5)
  _check(rope_frequencies(8, scaling={**base, "factor": 1.0}), PLAIN_8, 1.0)


# LongRoPE: depends on seq_len against original_max_position_embeddings.

LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 64,
            "short_factor": [1.0, 1.0, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0]}
SHORT = [1.0, 0.1, 0.01 / 1.5, 0.0005]
LONG = [1.0, 0.05, 0.0025, 0.000125]


@pytest.mark.parametrize("seq_len, expected", [(None, SHORT), (1, SHORT), (64, SHORT),
                                               (65, LONG), (4096, LONG)])
def test_longrope_factor_lists_switch_above_the_original_length(seq_len, expected):
  # factor = max_position_embeddings / original = 256 / 64 = 4; attention
  # sqrt(1 + ln 4 / ln 64) = sqrt(1 + 1/3) = sqrt(4/3).
  _check(rope_frequencies(8, scaling=LONGROPE, max_position_embeddings=256, seq_len=seq_len),
         expected, math.sqrt(4 / 3))
  # An explicit factor gives the same attention scaling without max_position_embeddings.
  _check(rope_frequencies(8, scaling={**LONGROPE, "factor": 4.0}, seq_len=seq_len),
         expected, math.sqrt(4 / 3))


def test_longrope_attention_scaling_cases():
  # Phi-3-mini-128k: 131072 / 4096 = 32 -> sqrt(1 + ln 32 / ln 4096) = sqrt(1 + 5/12).
  scaling = {**LONGROPE, "original_max_position_embeddings": 4096}
  _check(rope_frequencies(8, scaling=scaling, max_position_embeddings=131072), SHORT,
         math.sqrt(17 / 12))
  _check(rope_frequencies(8, scaling=LONGROPE, max_position_embeddings=64), SHORT, 1.0)
  _check(rope_frequencies(8, scaling={**LONGROPE, "attention_factor": 1.25}), SHORT, 1.25)
  # Original length from max_position_embeddings when the dict has none (factor then 1).
  no_original = {k: v for k, v in LONGROPE.items() if k != "original_max_position_embeddings"}
  _check(rope_frequencies(8, scaling=no_original, max_position_embeddings=64, seq_len=65), LONG,
         1.0)


def test_longrope_with_a_traced_seq_len():
  fn = jax.jit(lambda n: rope_frequencies(8, scaling=LONGROPE, max_position_embeddings=256,
                                          seq_len=n))
  for n, expected in [(64, SHORT), (65, LONG)]:
    inv_freq, attention = fn(jnp.int32(n))
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    np.testing.assert_allclose(attention, math.sqrt(4 / 3), rtol=1e-6)


# Llama 3.1.


def test_llama3_bands():
  # original 128, low 1, high 4: wavelengths 2 pi * [1, 10, 100, 1000] against
  # high-frequency bound 128 / 4 = 32 and low-frequency bound 128 / 1 = 128.
  # 6.28 < 32: kept. 62.8: in between, smooth = (128 / 62.83 - 1) / (4 - 1) = 0.34573,
  # (1 - smooth) * 0.1 / 8 + smooth * 0.1. 628 and 6283 > 128: divided by 8.
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
  smooth = (128 / (2 * math.pi * 10) - 1) / 3
  assert math.isclose(smooth, 0.34572775719208676, rel_tol=1e-14)
  expected = [1.0, 0.042751178754307596, 0.00125, 0.000125]
  _check(rope_frequencies(8, scaling=scaling), expected)
  _check(rope_frequencies(8, scaling={k: v for k, v in scaling.items()
                                      if k != "original_max_position_embeddings"},
                          max_position_embeddings=128), expected)


def test_llama3_8b_configuration():
  # Llama 3.1 8B: head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192, so the
  # bands are wavelengths < 2048 kept, > 8192 divided by 8. Pair i has wavelength
  # 2 pi * 500000 ** (i / 64): pair 0 (6.28) kept; pair 30 (2949) in between; pairs 40
  # (22930) and 63 divided.
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  inv_freq, attention = rope_frequencies(128, 500000.0, scaling=scaling)
  assert attention == 1.0
  plain = lambda i: 500000.0 ** (-i / 64)
  assert 2048 < 2 * math.pi / plain(30) < 8192 < 2 * math.pi / plain(40)
  smooth = (8192 * plain(30) / (2 * math.pi) - 1) / 3
  np.testing.assert_allclose(np.asarray(inv_freq)[[0, 30, 40, 63]],
                             [1.0, (1 - smooth) * plain(30) / 8 + smooth * plain(30),
                              plain(40) / 8, plain(63) / 8], rtol=1e-6)


# Validation.


@pytest.mark.parametrize("kwargs, match", [
    (dict(scaling={"rope_type": "ntk-by-parts", "factor": 2.0}), "rope_type"),
    (dict(scaling={"factor": 2.0}), "rope_type"),
    (dict(scaling={"rope_type": "linear", "type": "yarn", "factor": 2.0}), "alias"),
    (dict(scaling="linear"), "scaling must be None or a dict"),
    (dict(scaling={"rope_type": "linear"}), r"requires scaling\['factor'\]"),
    (dict(scaling={"rope_type": "linear", "factor": 0.0}), r"scaling\['factor'\].*positive"),
    (dict(scaling={"rope_type": "ntk", "factor": -2.0}), r"scaling\['factor'\].*positive"),
    (dict(scaling={"rope_type": "yarn", "factor": 0}, max_position_embeddings=64),
     r"scaling\['factor'\].*positive"),
    (dict(scaling={"rope_type": "linear", "factor": "2"}), r"scaling\['factor'\]"),
    (dict(scaling={"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}),
     "not read by rope_type 'linear'"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0, "orignal_max_position_embeddings": 8},
          max_position_embeddings=8), "orignal_max_position_embeddings"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
    (dict(scaling={"rope_type": "yarn", "original_max_position_embeddings": 64}),
     r"requires scaling\['factor'\]"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 32},
          max_position_embeddings=64), "beta_fast"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0, "truncate": "no"},
          max_position_embeddings=64), "truncate"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0, "attention_factor": -1.0},
          max_position_embeddings=64), "attention_factor"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0}, seq_len=128),
     "original_max_position_embeddings"),
    (dict(scaling={k: v for k, v in LONGROPE.items() if k != "short_factor"}, seq_len=65),
     r"requires scaling\['short_factor'\].*4 positive"),
    (dict(scaling={k: v for k, v in LONGROPE.items() if k != "long_factor"}),
     r"requires scaling\['long_factor'\]"),
    (dict(scaling={**LONGROPE, "long_factor": [1.0, 2.0, 4.0]}, max_position_embeddings=256),
     r"scaling\['long_factor'\].*rotary_dim // 2 = 4"),
    (dict(scaling={**LONGROPE, "short_factor": [1.0, 0.0, 1.0, 1.0]},
          max_position_embeddings=256), r"scaling\['short_factor'\].*positive"),
    (dict(scaling=LONGROPE), "factor"),  # Neither factor, attention_factor nor max length.
    (dict(scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 64}), "high_freq_factor"),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                   "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
     "high_freq_factor'\\] > "),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0}), "original_max_position_embeddings"),
    (dict(scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
     "disagrees with the argument theta"),
    (dict(scaling={"rope_type": "default", "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(partial_rotary_factor=0.3), "rotary_dim"),  # With head_dim 10: int(3.0) = 3, odd.
    (dict(theta=0.0), "theta"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(seq_len=-1), "seq_len"),
    (dict(seq_len=2.5), "seq_len"),
])
def test_bad_arguments_raise(kwargs, match):
  head_dim = 10 if kwargs.get("partial_rotary_factor") == 0.3 else 8
  with pytest.raises(ValueError, match=match):
    rope_frequencies(head_dim, **kwargs)


def test_ntk_needs_more_than_one_pair():
  with pytest.raises(ValueError, match="rotary_dim > 2"):
    rope_frequencies(2, scaling={"rope_type": "ntk", "factor": 2.0})
  with pytest.raises(ValueError, match="rotary_dim > 2"):
    rope_frequencies(8, partial_rotary_factor=0.25,
                     scaling={"rope_type": "dynamic", "factor": 2.0},
                     max_position_embeddings=8, seq_len=16)


# Application: the attention scaling and partial rotary in apply_rope.


def _rope64(x, pos, inv_freq, layout, scale=1.0):
  """Float64 NumPy: rotate the first 2 * len(inv_freq) coordinates, cos/sin times scale."""
  x = ref.f64(x)
  rotary_dim = 2 * len(inv_freq)
  rotated = ref.rope(x[..., :rotary_dim], pos, inv_freq, layout)
  return np.concatenate([scale * rotated, x[..., rotary_dim:]], axis=-1)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_apply_rope_with_yarn_scaling_and_partial_rotary(layout):
  scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
  freqs = rope_frequencies(16, scaling=scaling, partial_rotary_factor=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 7, 3, 16))
  pos = jax.random.randint(jax.random.key(1), (2, 7), -300, 300)
  out = apply_rope(x, pos, freqs, layout=layout)
  expected = _rope64(x, pos, [1.0, 0.0625, 0.0025, 0.00025], layout, 0.1 * math.log(4) + 1)
  np.testing.assert_allclose(out, expected, atol=3e-5)
  np.testing.assert_array_equal(out[..., 8:], x[..., 8:])  # The pass-through half.
  # The same with the pair unpacked.
  inv_freq, attention = freqs
  np.testing.assert_array_equal(
      apply_rope(x, pos, inv_freq, layout=layout, attention_scaling=attention), out)
  with pytest.raises(ValueError, match="attention_scaling given twice"):
    apply_rope(x, pos, freqs, attention_scaling=attention)


def test_apply_rope_bfloat16_angles_in_float32_with_scaling():
  # bfloat16 positions would put 100 000 + p on a grid of 512: angles must be float32.
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
  freqs = rope_frequencies(8, scaling=scaling)
  x = jax.random.normal(jax.random.key(2), (1, 6, 2, 8), jnp.bfloat16)
  pos = 100_000 + jnp.arange(6, dtype=jnp.int32)[None] * 7
  out = apply_rope(x, pos, freqs)
  assert out.dtype == jnp.bfloat16
  expected = _rope64(x, pos, [1.0, 0.042751178754307596, 0.00125, 0.000125], "half")
  # float32 angles near 1e5 (ulp 2^-7 rad) plus bfloat16 output rounding.
  np.testing.assert_allclose(ref.f64(out), expected, atol=2e-2)


def test_jit_through_apply_rope_under_the_old_call_pattern():
  # layers/attention.py: inv_freq = rope_frequencies(head_dim, theta); apply_rope(q, pos, inv_freq).
  x = jax.random.normal(jax.random.key(3), (1, 5, 2, 8))
  pos = jnp.arange(5, dtype=jnp.int32)[None]
  fn = jax.jit(lambda x: apply_rope(x, pos, rope_frequencies(8, 10000.0)))
  np.testing.assert_allclose(fn(x), ref.rope(x, np.asarray(pos), ref.inv_freq(8)), atol=1e-5)


# The gin files of configs/positions.


@gin.configurable("rope_scaling_test_positions")
def _positions(theta=gin.REQUIRED, scaling=gin.REQUIRED):
  return theta, scaling


@pytest.mark.parametrize("name, rope_type", [
    ("rope", None), ("pi", "linear"), ("ntk", "ntk"), ("dynamic_ntk", "dynamic"),
    ("yarn", "yarn"), ("longrope", "longrope"), ("llama3", "llama3")])
def test_gin_position_files_give_valid_scalings(name, rope_type):
  gin.clear_config()
  gin.parse_config_files_and_bindings(
      [str(CONFIGS / f"{name}.gin")],
      ["SEQ_LEN = 64", "rope_scaling_test_positions.theta = %ROPE_THETA",
       "rope_scaling_test_positions.scaling = %ROPE_SCALING"])
  theta, scaling = _positions()
  assert (scaling or {}).get("rope_type") == rope_type
  if rope_type not in (None, "linear", "ntk"):
    assert scaling["original_max_position_embeddings"] == 64
  # tiny.gin: 64 features / 4 heads = head_dim 16; evaluated at 4x the training length.
  short, _ = rope_frequencies(16, theta, scaling=scaling, seq_len=64)
  long, attention = rope_frequencies(16, theta, scaling=scaling, seq_len=256)
  plain, _ = rope_frequencies(16, theta)
  assert attention >= 1.0
  if rope_type is not None:
    # Every method slows the slowest pair at the long length, none speeds any pair up.
    assert long[-1] < plain[-1] * (1 - 1e-3)
    assert np.all(np.asarray(long) <= np.asarray(plain) * (1 + 1e-6))
  if rope_type in ("dynamic", "longrope"):
    np.testing.assert_allclose(short, plain, rtol=1e-6)  # Unscaled at the training length.


def test_nope_gin_binds_no_positions():
  gin.clear_config()
  gin.parse_config_files_and_bindings(
      [str(CONFIGS / "nope.gin")],
      ["rope_scaling_test_positions.theta = %ROPE_THETA",
       "rope_scaling_test_positions.scaling = %ROPE_SCALING"])
  assert _positions() == (None, None)


def test_rope_types_are_exported():
  assert set(rope.ROPE_TYPES) == {"default", "linear", "ntk", "dynamic", "yarn", "longrope",
                                  "llama3"}
