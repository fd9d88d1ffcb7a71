"""Attention layer: a hand computation from its own parameters, masking, implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_layers as ref
from layers import Attention
from pallas_kernels._common.testing import assert_close
from pallas_kernels.flash_attention.reference import flash_attention_reference

FEATURES = 32


def _attention(num_heads=4, num_kv_heads=None, *, seed=0, **kwargs):
  """An Attention layer whose QK-norm scales (initialised to ones) are randomised too."""
  layer = Attention(FEATURES, num_heads, num_kv_heads=num_kv_heads, rngs=nnx.Rngs(seed),
                    **kwargs)
  for i, norm in enumerate([layer.q_norm, layer.k_norm]):
    if norm is not None:
      norm.scale[...] = jax.random.uniform(
          jax.random.key(100 + i), norm.scale.shape, minval=0.5, maxval=1.5)
  return layer


def _x(batch=2, seq=16, seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (batch, seq, FEATURES), dtype=dtype)


def _by_hand(layer, x, position_ids=None, segment_ids=None, *, rope_theta=10000.0,
             is_causal=True, logits_soft_cap=None):
  """Projections, QK-norm and RoPE in float64 NumPy; reference attention; out projection."""
  x64 = ref.f64(x)
  q = np.einsum("btf,fhd->bthd", x64, ref.f64(layer.q_proj.kernel[...]))
  k = np.einsum("btf,fhd->bthd", x64, ref.f64(layer.k_proj.kernel[...]))
  v = np.einsum("btf,fhd->bthd", x64, ref.f64(layer.v_proj.kernel[...]))
  if layer.q_norm is not None:
    q = ref.rms_norm(q, layer.q_norm.scale[...])
    k = ref.rms_norm(k, layer.k_norm.scale[...])
  if rope_theta is not None:
    if position_ids is None:
      position_ids = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])
    freqs = ref.inv_freq(q.shape[-1], rope_theta)
    q, k = ref.rope(q, position_ids, freqs), ref.rope(k, position_ids, freqs)
  out = flash_attention_reference(
      *(jnp.asarray(a, jnp.float32) for a in (q, k, v)), is_causal=is_causal,
      segment_ids=segment_ids, logits_soft_cap=logits_soft_cap)
  return np.einsum("bthd,hdf->btf", ref.f64(out), ref.f64(layer.o_proj.kernel[...]))


@pytest.mark.parametrize("num_heads, num_kv_heads, options", [
    pytest.param(4, 4, {}, id="mha"),
    pytest.param(4, 2, {"use_qk_norm": True}, id="gqa-qk_norm"),
    pytest.param(4, 1, {"logits_soft_cap": 5.0}, id="mqa-soft_cap"),
    pytest.param(4, 2, {"rope_theta": None, "is_causal": False}, id="gqa-nope-bidirectional"),
    pytest.param(2, 1, {"head_dim": 24, "rope_theta": 500.0}, id="mqa-head_dim"),
])
def test_matches_hand_computation(num_heads, num_kv_heads, options):
  layer = _attention(num_heads, num_kv_heads, **options)
  x = _x()
  hand_options = {k: v for k, v in options.items() if k not in ("use_qk_norm", "head_dim")}
  assert_close("attention_output", jnp.float32, layer(x), _by_hand(layer, x, **hand_options))


def test_position_and_segment_ids_reach_rope_and_kernel():
  layer = _attention(4, 2, use_qk_norm=True)
  x = _x(seq=12)
  segment_ids = jnp.asarray([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3], jnp.int32)
  # Not a shift of 0..T-1 within any segment: RoPE would be blind to a uniform shift.
  position_ids = jax.random.randint(jax.random.key(5), (2, 12), 0, 300, dtype=jnp.int32)
  out = layer(x, position_ids=position_ids, segment_ids=segment_ids)
  assert_close("attention_output", jnp.float32, out,
               _by_hand(layer, x, position_ids, segment_ids))
  assert not np.allclose(out, _by_hand(layer, x, None, segment_ids), atol=1e-3)
  assert not np.allclose(out, _by_hand(layer, x, position_ids, None), atol=1e-3)


def test_projection_shapes_and_no_bias():
  layer = Attention(FEATURES, 4, num_kv_heads=2, head_dim=16, use_qk_norm=True,
                    rngs=nnx.Rngs(0))
  flat = nnx.to_flat_state(nnx.state(layer, nnx.Param))
  shapes = {"/".join(map(str, path)): leaf.shape for path, leaf in flat}
  assert shapes == {
      "q_proj/kernel": (FEATURES, 4, 16), "k_proj/kernel": (FEATURES, 2, 16),
      "v_proj/kernel": (FEATURES, 2, 16), "o_proj/kernel": (4, 16, FEATURES),
      "q_norm/scale": (16,), "k_norm/scale": (16,)}


def _perturb(x, positions, seed=7):
  noise = jax.random.normal(jax.random.key(seed), (x.shape[0], len(positions), x.shape[2]))
  return x.at[:, positions].add(noise)


def test_causal_future_tokens_do_not_change_earlier_outputs():
  x = _x(seq=20)
  t = 11
  x_changed = _perturb(x, [t, 15])
  causal = _attention(4, 2)
  out, out_changed = causal(x), causal(x_changed)
  np.testing.assert_allclose(out_changed[:, :t], out[:, :t], rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(out_changed[:, t:] - out[:, t:]).max(axis=-1) > 1e-4)
  # Without the causal mask the same change reaches every position.
  bidirectional = _attention(4, 2, is_causal=False)
  diff = np.abs(bidirectional(x_changed) - bidirectional(x)).max(axis=-1)
  assert np.all(diff > 1e-4)


@pytest.mark.parametrize("is_causal", [True, False])
def test_segments_do_not_see_each_other(is_causal):
  layer = _attention(4, 1, is_causal=is_causal)
  segment_ids = jnp.asarray([[0] * 6 + [1] * 6 + [2] * 4] * 2, jnp.int32)
  x = _x(seq=16)
  out = layer(x, segment_ids=segment_ids)
  out_changed = layer(_perturb(x, [6, 8, 11]), segment_ids=segment_ids)
  diff = np.abs(out_changed - out).max(axis=-1)
  in_segment_1 = np.asarray(segment_ids[0] == 1)
  np.testing.assert_allclose(diff[:, ~in_segment_1], 0.0, atol=1e-6)
  assert np.all(diff[:, in_segment_1][:, 2 if is_causal else 0:] > 1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_and_reference_implementations_agree(dtype):
  options = dict(num_kv_heads=2, use_qk_norm=True, logits_soft_cap=20.0, dtype=dtype)
  xla = _attention(4, implementation="xla", **options)
  reference = _attention(4, implementation="reference", **options)
  x = _x(seq=24, dtype=dtype)
  segment_ids = jnp.asarray([[0] * 10 + [1] * 14, [0] * 24], jnp.int32)
  out = xla(x, segment_ids=segment_ids)
  assert out.dtype == dtype
  # The tolerance is the kernel's; in bfloat16 the output projection then sums 64 products
  # of kernel outputs that may differ by one rounding, so allow twice the kernel's error.
  scale = 2.0 if dtype == jnp.bfloat16 else 1.0
  assert_close("attention_output", dtype, out, reference(x, segment_ids=segment_ids),
               scale=scale)


def test_jit_matches_eager():
  layer = _attention(4, 2, use_qk_norm=True)
  x = _x()
  jitted = nnx.jit(lambda module, inputs: module(inputs))
  assert_close("attention_output", jnp.float32, jitted(layer, x), layer(x))


def test_parameter_gradients_are_finite_and_match_reference():
  options = dict(num_kv_heads=2, use_qk_norm=True)
  x = _x(seq=16)
  w = jax.random.normal(jax.random.key(9), x.shape)
  segment_ids = jnp.asarray([[0] * 7 + [1] * 9] * 2, jnp.int32)
  loss = lambda module: jnp.sum(module(x, segment_ids=segment_ids) * w)
  grads = {impl: nnx.grad(loss)(_attention(4, implementation=impl, **options))
           for impl in ("xla", "reference")}
  flat = {impl: dict(nnx.to_flat_state(g)) for impl, g in grads.items()}
  assert len(flat["xla"]) == 6
  for path, leaf in flat["xla"].items():
    g = np.asarray(leaf[...])
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path
    assert_close("dq", jnp.float32, g, flat["reference"][path][...], name="/".join(map(str, path)))


@pytest.mark.parametrize("num_heads, num_kv_heads", [(6, 4), (2, 4)])
def test_heads_not_divisible_raise(num_heads, num_kv_heads):
  with pytest.raises(ValueError, match=f"num_heads={num_heads}.*num_kv_heads={num_kv_heads}"):
    Attention(48, num_heads, num_kv_heads=num_kv_heads, head_dim=8, rngs=nnx.Rngs(0))


def test_features_not_divisible_by_heads_raises_without_head_dim():
  with pytest.raises(ValueError, match="head_dim"):
    Attention(FEATURES, 5, rngs=nnx.Rngs(0))
