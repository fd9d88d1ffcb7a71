"""titans_memory: the rule itself, the chunked XLA path against the token-by-token reference
(float64, values and every gradient, linear and MLP memories), carried state, extreme gates,
bfloat16, validation. The Pallas kernels are held to the XLA path in
``test_titans_memory_kernels.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common.testing import assert_close, relative_rms
from pallas_kernels.titans_memory import memory_apply, titans_memory, titans_memory_reference


def _inputs(seed, b, t, h, d_k, d_v, dtype=jnp.float32, hidden=(), lr_scale=0.3):
  r = np.random.default_rng(seed)
  arr = lambda *shape, scale=1.0: jnp.asarray(r.normal(size=shape) * scale, dtype)
  gate = lambda scale=1.0: jnp.asarray(r.uniform(size=(b, t, h)) * scale, dtype)
  q, k = arr(b, t, h, d_k), arr(b, t, h, d_k)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # the module's L2-normalised keys
  dims = (d_k,) + tuple(hidden) + (d_v,)
  w = tuple(arr(b, h, dims[i], dims[i + 1], scale=dims[i] ** -0.5) for i in range(len(dims) - 1))
  s = tuple(arr(b, h, dims[i], dims[i + 1], scale=0.1) for i in range(len(dims) - 1))
  state = (w, s) if hidden else (w[0], s[0])
  return dict(q=q, k=k, v=arr(b, t, h, d_v), lr=gate(lr_scale), momentum=gate(),
              decay=gate(0.2)), state


def test_rule_pinned_by_a_numpy_loop():
  """The linear rule spelled out in numpy: gradients at the chunk-start memory, momentum,
  forgetting, and the read after the write at the same step."""
  a, (m0, s0) = _inputs(0, 1, 7, 1, 3, 2)
  chunk = 3
  npf = lambda x: np.asarray(x, np.float64)
  q, k, v = npf(a["q"])[0, :, 0], npf(a["k"])[0, :, 0], npf(a["v"])[0, :, 0]
  theta, eta, alpha = (npf(a[n])[0, :, 0] for n in ("lr", "momentum", "decay"))
  m, s = npf(m0)[0, 0], npf(s0)[0, 0]
  out = []
  for t in range(7):
    if t % chunk == 0:
      m_start = m.copy()
    grad = np.outer(k[t], k[t] @ m_start - v[t])  # d/dM of 1/2 |k M - v|^2
    s = eta[t] * s - theta[t] * grad
    m = (1 - alpha[t]) * m + s
    out.append(q[t] @ m)
  for impl in ("reference", "xla"):
    o, (m_fin, s_fin) = titans_memory(**a, chunk_size=chunk, initial_state=(m0, s0),
                                      return_final_state=True, implementation=impl)
    np.testing.assert_allclose(np.asarray(o)[0, :, 0], np.stack(out), atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(np.asarray(m_fin)[0, 0], m, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(np.asarray(s_fin)[0, 0], s, atol=1e-5, err_msg=impl)


def _loss_and_grads(impl, a, state, chunk):
  """Outputs, final state and the gradients of a random projection of both w.r.t. every
  input (q, k, v, the gates and the initial state)."""
  r = np.random.default_rng(99)

  def run(a, state):
    return titans_memory(**a, chunk_size=chunk, initial_state=state, return_final_state=True,
                         implementation=impl)

  (o, final), vjp = jax.vjp(run, a, state)
  cot = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), x.dtype), (o, final))
  return (o, final), vjp(cot)


@pytest.mark.parametrize("hidden", [(), (6,)], ids=["linear", "mlp2"])
def test_float64_chunked_equals_token_by_token(hidden):
  """The chunked algorithm is the rule: float64 agreement to 1e-6 of values and gradients
  (chunk 1 = fully sequential, and chunks of 4 with a ragged last one)."""
  with jax.enable_x64(True):
    a, state = _inputs(1, 2, 11, 2, 4, 5, jnp.float64, hidden)
    for chunk in (1, 4):  # 1: fully sequential; 4: a ragged last chunk
      ref = _loss_and_grads("reference", a, state, chunk)
      ours = _loss_and_grads("xla", a, state, chunk)
      for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert got.dtype == want.dtype
        assert relative_rms(got, want) < 1e-6, chunk


def test_float64_three_layer_memory_and_none_picks_xla():
  with jax.enable_x64(True):
    a, state = _inputs(2, 1, 9, 2, 3, 3, jnp.float64, hidden=(5, 4))
    ref = titans_memory(**a, chunk_size=3, initial_state=state, implementation="reference")
    ours = titans_memory(**a, chunk_size=3, initial_state=state)  # None: XLA on CPU
    assert relative_rms(ours, ref) < 1e-6


@pytest.mark.parametrize("hidden", [(), (6,)], ids=["linear", "mlp2"])
def test_float64_pieces_with_carried_state_equal_one_pass(hidden):
  """Pieces of whole chunks, each starting from the state the previous one returned."""
  with jax.enable_x64(True):
    a, state = _inputs(3, 2, 24, 2, 4, 4, jnp.float64, hidden)
    whole, final = titans_memory(**a, chunk_size=4, initial_state=state,
                                 return_final_state=True, implementation="xla")
    pieces = []
    for lo, hi in ((0, 8), (8, 20), (20, 24)):
      cut = {n: x[:, lo:hi] for n, x in a.items()}
      o, state = titans_memory(**cut, chunk_size=4, initial_state=state,
                               return_final_state=True, implementation="xla")
      pieces.append(o)
    assert relative_rms(jnp.concatenate(pieces, axis=1), whole) < 1e-9
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(final)):
      assert relative_rms(got, want) < 1e-9


def test_read_is_the_memory_applied_to_the_query():
  """o_t is the final memory applied to q_t at the last token (the read follows the write)."""
  a, state = _inputs(4, 1, 6, 1, 4, 3, hidden=(5,))
  o, (w, _) = titans_memory(**a, chunk_size=4, initial_state=state, return_final_state=True,
                            implementation="xla")
  last = memory_apply(tuple(x[0, 0] for x in w), a["q"][0, -1, 0])
  np.testing.assert_allclose(np.asarray(o[0, -1, 0]), np.asarray(last), atol=1e-5)


def test_bfloat16_inputs_follow_the_float32_reference():
  a32, state = _inputs(5, 1, 40, 2, 8, 8)
  a16 = {n: x.astype(jnp.bfloat16) for n, x in a32.items()}
  ref, ref_final = titans_memory_reference(**a16, chunk_size=8, initial_state=state,
                                           return_final_state=True)
  o, final = titans_memory(**a16, chunk_size=8, initial_state=state, return_final_state=True,
                           implementation="xla")
  assert o.dtype == jnp.bfloat16 and final[0].dtype == jnp.float32
  assert_close("recurrent", jnp.bfloat16, o, ref)
  assert relative_rms(final[0], ref_final[0]) < 1e-4


def test_default_state_is_a_zero_linear_memory():
  a, _ = _inputs(6, 1, 5, 1, 3, 2)
  zero = (jnp.zeros((1, 1, 3, 2)),) * 2
  np.testing.assert_array_equal(
      np.asarray(titans_memory(**a, chunk_size=2, implementation="xla")),
      np.asarray(titans_memory(**a, chunk_size=2, initial_state=zero, implementation="xla")))


def test_no_nan_at_8k_tokens_with_extreme_gates():
  """theta near 1, alpha near 0 and exactly 1, eta exactly 0 and 1: finite values and
  gradients at 8K tokens (log gates are clamped, decays never exponentiate a positive sum)."""
  b, t, h, d = 1, 8192, 3, 8
  a, state = _inputs(7, b, t, h, d, d)
  r = np.random.default_rng(7)
  pick = lambda *vals: jnp.asarray(r.choice(vals, size=(b, t, h)), jnp.float32)
  a.update(lr=pick(0.999, 1.0), decay=pick(0.0, 1e-7, 1.0), momentum=pick(0.0, 1.0, 0.999))

  def loss(a):
    o, (m, s) = titans_memory(**a, chunk_size=64, initial_state=state,
                              return_final_state=True, implementation="xla")
    return jnp.mean(o ** 2) + jnp.mean(m ** 2) + jnp.mean(s ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(a)
  assert np.isfinite(float(value))
  for name, g in grads.items():
    assert np.all(np.isfinite(np.asarray(g))), name


def test_empty_sequence():
  a, state = _inputs(8, 2, 0, 2, 3, 4)
  o, final = titans_memory(**a, chunk_size=4, initial_state=state, return_final_state=True)
  assert o.shape == (2, 0, 2, 4)
  np.testing.assert_array_equal(np.asarray(final[0]), np.asarray(state[0]))


@pytest.mark.parametrize("change, message", [
    (lambda a, s: ({**a, "q": a["q"][0]}, s), "q must have rank 4"),
    (lambda a, s: ({**a, "k": a["k"][:, :, :, :2]}, s), "k must have shape"),
    (lambda a, s: ({**a, "v": a["v"][:, :3]}, s), "v must be"),
    (lambda a, s: ({**a, "lr": a["lr"][:, :3]}, s), "lr must have shape"),
    (lambda a, s: ({**a, "decay": a["decay"].astype(jnp.int32)}, s), "decay must be a floating"),
    (lambda a, s: (a, (s[0][:, :, :2], s[1])), "initial_state M\\[0\\] must have shape"),
    (lambda a, s: (a, (s[0], s[1][..., :1])), "initial_state S\\[0\\] must have shape"),
    (lambda a, s: (a, ((s[0],), s[1])), "must both be arrays"),
    (lambda a, s: (a, ((s[0], s[0]), (s[1], s[1]))), "initial_state M\\[1\\] must have shape"),
    (lambda a, s: (a, (s[0],)), "must be a pair"),
])
def test_bad_inputs_raise_clear_errors(change, message):
  a, state = _inputs(9, 1, 5, 2, 4, 3)
  a, state = change(a, state)
  with pytest.raises(ValueError, match=message):
    titans_memory(**a, chunk_size=2, initial_state=state)


def test_bad_chunk_size_and_implementation():
  a, _ = _inputs(10, 1, 5, 1, 4, 3)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    titans_memory(**a, chunk_size=0)
  with pytest.raises(ValueError, match="implementation must be one of"):
    titans_memory(**a, chunk_size=2, implementation="cuda")
  with pytest.raises(ValueError, match="needs a TPU or GPU"):
    titans_memory(**a, chunk_size=8, implementation="pallas")
  with jax.enable_x64(True):
    a64 = {n: x.astype(jnp.float64) for n, x in a.items()}
    with pytest.raises(ValueError, match="float64 inputs"):
      titans_memory(**a64, chunk_size=8, implementation="interpret")
