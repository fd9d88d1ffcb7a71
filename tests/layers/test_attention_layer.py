"""Attention layer: a hand computation from its own parameters, masking, implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_layers as ref
from layers import Attention, kernel_sharding
from pallas_kernels import masks
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
             is_causal=True, logits_soft_cap=None, visible=None):
  """Projections, QK-norm and RoPE in float64 NumPy; reference attention (or, given the
  explicit mask ``visible`` [heads, seq, seq], NumPy attention); out projection."""
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
  if visible is not None:
    out = ref.masked_attention(q, k, v, visible)
  else:
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


# ------------------------------------------------------------------------- sparse attention


def _dense(rule, num_heads, seq):
  """[heads, seq, seq] bool from ``rule(head, q, k)`` evaluated on index grids."""
  q, k = np.meshgrid(np.arange(seq), np.arange(seq), indexing="ij")
  return np.stack([np.broadcast_to(rule(h, q, k), (seq, seq)) for h in range(num_heads)])


def _s2_rule(num_heads, group):
  """LongLoRA S²-Attn, causal: groups of ``group``; the second half of the heads shifted."""
  def rule(h, q, k):
    shift = group // 2 if h >= num_heads // 2 else 0
    return (k <= q) & ((q + shift) // group == (k + shift) // group)
  return rule


SEQ = 18
_call = nnx.jit(lambda module, x: module(x))

SPARSE_CASES = [
    # (id, num_heads, num_kv_heads, layer options, rule(head, q, k) of the visible pairs)
    ("window-int", 4, 2, dict(local_window_size=3),
     lambda h, q, k: (k <= q) & (k >= q - 3)),
    ("window-pair-bidirectional", 4, 4, dict(local_window_size=(2, 1), is_causal=False),
     lambda h, q, k: (k >= q - 2) & (k <= q + 1)),
    ("window-sinks", 4, 1, dict(local_window_size=2, num_sink_tokens=3),
     lambda h, q, k: (k <= q) & ((k >= q - 2) | (k < 3))),
    ("chunk", 4, 2, dict(chunk_size=5),
     lambda h, q, k: (k <= q) & (q // 5 == k // 5)),
    ("shared-mask", 4, 2, dict(mask=masks.ChunkedMask(4, offset=2)),
     lambda h, q, k: (k <= q) & ((q + 2) // 4 == (k + 2) // 4)),
    ("per-head-windows-gqa", 4, 2,
     dict(mask=masks.per_head_windows([None, 1, 4, None], is_causal=False)),
     lambda h, q, k: (k <= q) & (k >= q - [SEQ, 1, 4, SEQ][h])),
    ("per-head-windows-sinks", 4, 4,
     dict(local_window_size=6,
          mask=masks.per_head_windows([None, 1, (2, 0), 5], is_causal=False, num_sink_tokens=2)),
     lambda h, q, k: (k <= q) & (k >= q - 6) & (
         (k >= q - [SEQ, 1, 2, 5][h]) | ((k < 2) & (h > 0)))),
    ("s2-attn", 4, 2, dict(shifted_sparse_group_size=6), _s2_rule(4, 6)),
    ("s2-attn-and-window", 4, 4, dict(shifted_sparse_group_size=8, local_window_size=4),
     lambda h, q, k: _s2_rule(4, 8)(h, q, k) & (k >= q - 4)),
    ("s2-attn-eval-mode", 4, 2, dict(shifted_sparse_group_size=6, deterministic=True),
     lambda h, q, k: k <= q),
]


@pytest.mark.parametrize("num_heads, num_kv_heads, options, rule",
                         [pytest.param(*c[1:], id=c[0]) for c in SPARSE_CASES])
def test_sparse_options_match_hand_computation(num_heads, num_kv_heads, options, rule):
  layer = _attention(num_heads, num_kv_heads, use_qk_norm=True, **options)
  x = _x(seq=SEQ)
  visible = _dense(rule, num_heads, SEQ)
  assert not visible.all(axis=(1, 2)).any() or options.get("deterministic")  # really sparse
  assert_close("attention_output", jnp.float32, _call(layer, x),
               _by_hand(layer, x, visible=visible))


def test_s2_attn_applies_in_training_mode_only():
  layer = _attention(4, 2, shifted_sparse_group_size=4)
  x = _x(seq=16)
  train_out = _call(layer, x)
  layer.eval()
  assert layer.deterministic
  full = _by_hand(layer, x, visible=_dense(lambda h, q, k: k <= q, 4, 16))
  assert_close("attention_output", jnp.float32, _call(layer, x), full)
  assert not np.allclose(train_out, full, atol=1e-3)
  layer.train()
  assert_close("attention_output", jnp.float32, _call(layer, x), train_out)


@pytest.mark.parametrize("options", [
    pytest.param(dict(local_window_size=3, num_sink_tokens=2, logits_soft_cap=10.0), id="window"),
    pytest.param(dict(mask=masks.per_head_windows([None, 2, 5, None], is_causal=False,
                                                  num_sink_tokens=1)), id="per-head"),
    pytest.param(dict(shifted_sparse_group_size=6, chunk_size=9), id="s2-chunk"),
])
def test_sparse_xla_matches_reference_with_gradients(options):
  x = _x(seq=21)
  w = jax.random.normal(jax.random.key(9), x.shape)
  segment_ids = jnp.asarray([[0] * 12 + [1] * 9, [0] * 21], jnp.int32)
  loss = lambda module: jnp.sum(module(x, segment_ids=segment_ids) * w)
  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  layers_ = {impl: _attention(4, 2, implementation=impl, **options)
             for impl in ("xla", "reference")}
  results = {impl: value_and_grad(layer) for impl, layer in layers_.items()}
  assert_close("attention_output", jnp.float32, results["xla"][0], results["reference"][0],
               scale=x.size)  # a sum over all outputs
  grads = {impl: dict(nnx.to_flat_state(g)) for impl, (_, g) in results.items()}
  for path, leaf in grads["xla"].items():
    g = np.asarray(leaf[...])
    assert np.all(np.isfinite(g)), path
    assert_close("dq", jnp.float32, g, grads["reference"][path][...],
                 name="/".join(map(str, path)))


def _split_heads_sharder(num_shards):
  """A stand-in for the training code's shard_map: runs ``fn`` on contiguous blocks of the
  "kv_heads" axis one after the other and concatenates the outputs."""
  def sharder(fn, args, in_axes, out_axes):
    outs = []
    for shard in range(num_shards):
      pieces = []
      for arg, axes in zip(args, in_axes):
        if arg is None or axes is None or "kv_heads" not in axes:
          pieces.append(arg)
          continue
        axis = axes.index("kv_heads")
        size = arg.shape[axis] // num_shards
        pieces.append(jax.lax.slice_in_dim(arg, shard * size, (shard + 1) * size, axis=axis))
      outs.append(fn(*pieces))
    return jnp.concatenate(outs, axis=out_axes.index("kv_heads"))
  return sharder


@pytest.mark.parametrize("options", [
    pytest.param(dict(shifted_sparse_group_size=4), id="s2-attn"),
    pytest.param(dict(mask=masks.per_head_windows([2, None, 3, 3, None, 1, 1, 1],
                                                  is_causal=False)), id="per-head"),
])
def test_per_head_masks_follow_their_heads_across_head_shards(options):
  """Each shard of the heads gets the entries of the per-head mask of its own heads (under
  jit the shard index is traced: the kernel call switches on it)."""
  layer = _attention(8, 4, **options)
  x = _x(seq=12)
  want = _call(layer, x)
  for shards in (2, 4):
    # A fresh jit per sharder: jit's cache does not know about the installed sharder.
    call = nnx.jit(lambda module, inputs: module(inputs))
    with kernel_sharding(_split_heads_sharder(shards)):
      assert_close("attention_output", jnp.float32, call(layer, x), want)


@pytest.mark.parametrize("options, message", [
    (dict(local_window_size=-1), "left must be a non-negative int"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size must be an int"),
    (dict(local_window_size=2.5), "local_window_size must be an int"),
    (dict(num_sink_tokens=2), "num_sink_tokens=2 only widens a sliding window"),
    (dict(local_window_size=2, num_sink_tokens=-1), "num_sink_tokens must be a non-negative"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(mask="causal"), "mask must be a pallas_kernels.masks.Mask"),
    (dict(mask=masks.per_head_windows([1, None])),
     r"per-head mask has 2 entries but the layer has num_heads=4"),
    (dict(shifted_sparse_group_size=5), r"shifted_sparse_group_size=5 .*S²-Attn.*even"),
    (dict(shifted_sparse_group_size="8"), "shifted_sparse_group_size must be an even int"),
])
def test_bad_sparse_options_raise_at_construction(options, message):
  with pytest.raises(ValueError, match=message):
    Attention(FEATURES, 4, rngs=nnx.Rngs(0), **options)


def test_s2_attn_needs_an_even_number_of_heads():
  with pytest.raises(ValueError, match="num_heads must be even"):
    Attention(30, 3, shifted_sparse_group_size=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("options, seq_len, want", [
    (dict(), 50, (50, 50)),
    (dict(local_window_size=7), 50, (8, 8)),            # keys c - 7 ... c
    (dict(local_window_size=7), 5, (5, 5)),
    (dict(local_window_size=(7, 0), num_sink_tokens=4), 50, (12, 12)),
    (dict(local_window_size=7, num_sink_tokens=4), 10, (10, 10)),  # sinks inside the window
    (dict(chunk_size=16), 50, (2, 2)),                  # the current chunk: 48, 49
    (dict(chunk_size=16), 48, (16, 16)),
    (dict(shifted_sparse_group_size=4), 50, (50, 50)),  # training-only: not in the cache
    (dict(is_causal=False, local_window_size=3), 50, (50, 50)),
    # A kv head keeps the union of its query heads' needs (GQA: heads 0, 1 | 2, 3).
    (dict(mask=masks.per_head_windows([3, None, 3, (5, 0)], is_causal=False,
                                      num_sink_tokens=2)), 50, (50, 8)),
    (dict(mask=masks.PerHeadMask((masks.ChunkedMask(10),) * 2 +
                                 (masks.ChunkedMask(10, offset=5),) * 2)), 50, (10, 5)),
])
def test_kv_cache_tokens(options, seq_len, want):
  layer = Attention(FEATURES, 4, num_kv_heads=2, rngs=nnx.Rngs(0), **options)
  assert layer.kv_cache_tokens(seq_len) == want
