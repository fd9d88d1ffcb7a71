"""The TPU Pallas kernels of titans_memory's 2-layer MLP memory (``tpu_mlp.py``) against the
chunked XLA path.

implementation="interpret" runs them in the Pallas interpreter (with ops.py's padding and
custom VJP around them). Checked: the output, the final state (W1, W2, S1, S2) and the
gradients of q, k, v, lr, momentum, decay and all four initial-state matrices, by
``jax.vjp`` with random cotangents on o and on the final state, for a ragged length (padded
last chunk, padded groups of chunks), a sequence shorter than a chunk, d_k != d_h != d_v,
bfloat16; plus the dispatch (depth 3 and GPU keep XLA, sizes that do not fit VMEM are a
ValueError, None on TPU picks the kernels). The lowering and Mosaic compile tests live in
test_titans_memory_lowering.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import dispatch
from pallas_kernels._common.testing import assert_close, relative_rms
from pallas_kernels.titans_memory import titans_memory

GATE_NAMES = ("q", "k", "v", "lr", "momentum", "decay")


def _inputs(seed, b, t, h, dk, dh, dv, dtype=jnp.float32):
  """Random inputs (gates in their usual ranges, a random 2-layer initial state) and random
  cotangents of (o, ((W1, W2), (S1, S2)))."""
  ks = jax.random.split(jax.random.key(seed), 16)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
  unit = lambda k, lo, hi: jax.random.uniform(k, (b, t, h), minval=lo, maxval=hi)
  w_shapes = ((b, h, dk, dh), (b, h, dh, dv))
  weights = tuple(normal(ks[6 + i], s) / np.sqrt(s[2]) for i, s in enumerate(w_shapes))
  moments = tuple(0.1 * normal(ks[8 + i], s) for i, s in enumerate(w_shapes))
  arrays = dict(
      q=(normal(ks[0], (b, t, h, dk)) / np.sqrt(dk)).astype(dtype),
      k=(normal(ks[1], (b, t, h, dk)) / np.sqrt(dk)).astype(dtype),
      v=normal(ks[2], (b, t, h, dv)).astype(dtype),
      lr=unit(ks[3], 0.05, 0.5), momentum=unit(ks[4], 0.3, 0.99),
      decay=unit(ks[5], 0.0, 0.3), state=(weights, moments))
  cotangents = (normal(ks[10], (b, t, h, dv)).astype(dtype),
                (tuple(normal(ks[11 + i], s) for i, s in enumerate(w_shapes)),
                 tuple(normal(ks[13 + i], s) for i, s in enumerate(w_shapes))))
  return arrays, cotangents


@functools.lru_cache(maxsize=None)
def _program(impl, chunk):
  """Jitted (o, final state, gradients) of one implementation."""

  def run(arrays, cotangents):
    def f(arrays):
      return titans_memory(*(arrays[n] for n in GATE_NAMES), chunk_size=chunk,
                           initial_state=arrays["state"], return_final_state=True,
                           implementation=impl)

    (o, final), vjp = jax.vjp(f, arrays)
    return o, final, vjp(cotangents)[0]

  return jax.jit(run)


def _named(result):
  o, ((w1, w2), (s1, s2)), grads = result
  named = {n: grads[n] for n in GATE_NAMES}
  (dw1, dw2), (ds1, ds2) = grads["state"]
  named.update(W1=dw1, W2=dw2, S1=ds1, S2=ds2)
  return o, dict(W1=w1, W2=w2, S1=s1, S2=s2), named


def _check(got, want, dtype):
  (o, final, grads), (o_w, final_w, grads_w) = _named(got), _named(want)
  assert_close("recurrent", dtype, o, o_w, name="o")
  for name in final:
    assert final[name].dtype == jnp.float32
    assert_close("recurrent", dtype, final[name], final_w[name], name=f"final {name}")
  assert grads.keys() == grads_w.keys()
  for name in grads:
    g, g_w = np.asarray(grads[name], np.float32), np.asarray(grads_w[name], np.float32)
    assert g.shape == g_w.shape and grads[name].dtype == grads_w[name].dtype, name
    assert np.all(np.isfinite(g)), f"d{name} has non-finite values"
    if dtype == jnp.bfloat16:
      # Products take bfloat16 operands (float32 ones as hi + lo halves); the activations
      # and the intra-chunk [C, C] weights are rounded to bfloat16, as flash attention's P.
      err = relative_rms(g, g_w)
      assert err <= 2e-2, f"d{name}: relative RMS error {err:.3g}"
    else:
      assert_close("recurrent", dtype, g, g_w, name=f"d{name}")


# (batch, seq, heads, d_k, d_h, d_v), chunk, dtype.
CASES = {
    # 13 chunks of 8: two grid steps of 8 chunks (the second padded by three), a padded last
    # chunk (100 = 12 * 8 + 4), d_k != d_h != d_v.
    "ragged_padded_groups": ((1, 100, 1, 8, 16, 12), 8, jnp.float32),
    "shorter_than_chunk": ((2, 5, 1, 8, 16, 8), 16, jnp.float32),
    # Two chunks, the second ragged (40 = 2 * 16 + 8).
    "bfloat16": ((1, 40, 2, 16, 16, 8), 16, jnp.bfloat16),
}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=[pytest.mark.slow] if c == "shorter_than_chunk" else [])
    for c in CASES])  # slow: about 8 s, and the ragged case covers a padded last chunk
def test_interpret_matches_xla(case):
  shape, chunk, dtype = CASES[case]
  arrays, cotangents = _inputs(1, *shape, dtype)
  got = _program("interpret", chunk)(arrays, cotangents)
  want = _program("xla", chunk)(arrays, cotangents)
  _check(got, want, dtype)


def test_group_stride_counts_the_hidden_width():
  from pallas_kernels.titans_memory import tpu_mlp
  plan = tpu_mlp._Plan(8192, 128, 256, 128, 64, 8192)
  assert plan.stride == 4  # 256 tokens per grid step at d_h 256
  assert plan.grid(1, 16) == (1, 16, 32)


def _args(arrays):
  return [arrays[n] for n in GATE_NAMES]


def test_depth_three_and_gpu_keep_xla():
  arrays, _ = _inputs(2, 1, 16, 1, 8, 8, 8)
  (w1, w2), (s1, s2) = arrays["state"]
  deep = ((w1, w2, w2), (s1, s2, s2))  # d_k 8 -> 8 -> 8 -> 8
  with pytest.raises(ValueError, match="an MLP memory of depth 3"):
    titans_memory(*_args(arrays), chunk_size=8, initial_state=deep,
                  implementation="interpret")
  with dispatch.target_platform("gpu"), pytest.raises(ValueError, match="on GPU"):
    titans_memory(*_args(arrays), chunk_size=16, initial_state=arrays["state"],
                  implementation="interpret")
  # None: the XLA path (no Pallas call) for depth 3 on TPU and depth 2 on GPU.
  for platform, state in (("tpu", deep), ("gpu", arrays["state"])):
    with dispatch.target_platform(platform):
      jaxpr = jax.make_jaxpr(functools.partial(titans_memory, chunk_size=16,
                                               initial_state=state))(*_args(arrays))
    assert "pallas_call" not in str(jaxpr), platform


def test_none_on_tpu_picks_the_kernels():
  arrays, _ = _inputs(3, 1, 16, 1, 8, 16, 8)
  with dispatch.target_platform("tpu"):
    jaxpr = jax.make_jaxpr(functools.partial(titans_memory, chunk_size=8,
                                             initial_state=arrays["state"]))(*_args(arrays))
  assert "lclm_titans_mlp_fwd" in str(jaxpr)


@pytest.mark.parametrize("dk, dh, dv", [(256, 128, 256), (64, 512, 64)])
def test_sizes_that_do_not_fit_raise(dk, dh, dv):
  b, t, h = 1, 8, 1
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  state = ((shape(b, h, dk, dh), shape(b, h, dh, dv)),) * 2
  args = (shape(b, t, h, dk), shape(b, t, h, dk), shape(b, t, h, dv), shape(b, t, h),
          shape(b, t, h), shape(b, t, h), state)
  call = lambda *a, **kw: titans_memory(*a[:6], chunk_size=8, initial_state=a[6], **kw)
  with pytest.raises(ValueError, match=rf"d_k={dk}, d_h={dh}, d_v={dv} .*d_k = d_v = 128 with"):
    jax.eval_shape(functools.partial(call, implementation="interpret"), *args)
  with dispatch.target_platform("tpu"):  # None: the XLA path
    jaxpr = jax.make_jaxpr(call)(*args)
  assert "pallas_call" not in str(jaxpr)


def test_chunks_above_128_raise():
  arrays, _ = _inputs(4, 1, 16, 1, 8, 16, 8)
  with pytest.raises(ValueError, match=r"chunk_size 256 \(the TPU kernels of the 2-layer MLP "
                     r"memory tile multiples of 8 up to 128"):
    titans_memory(*_args(arrays), chunk_size=256, initial_state=arrays["state"],
                  implementation="interpret")
