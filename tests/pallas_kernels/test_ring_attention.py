"""Ring attention and context parallelism on 8 fake CPU devices, against single-device attention.

Every case checks the output, the log-sum-exp and dq, dk, dv (through a loss that uses both
the output and the lse) against ``flash_attention_reference`` on the global arrays. Cases are
batched into a few subprocesses: each pays jax start-up and the fake-device set-up once.
"""

from __future__ import annotations

import pytest

import jax.numpy as jnp

from pallas_kernels import ring_attention

# Shared by the subprocesses: random inputs and the check of one case.
_PRELUDE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from pallas_kernels import (context_parallel_attention, flash_attention_reference,
                            ring_attention, ring_attention_reference)
from pallas_kernels.ring_attention import (context_parallel_shard, from_layout,
                                           load_balance_permutation, to_layout)
assert jax.device_count() == 8

def inputs(seed, b, t, h, hk, d, segments):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k = jax.random.normal(ks[1], (b, t, hk, d))
  v = jax.random.normal(ks[2], (b, t, hk, d))
  do = jax.random.normal(ks[3], (b, t, h, d))
  dl = jax.random.normal(ks[4], (b, t, h))
  seg = None
  if segments:  # Packed documents, a few of them spanning device boundaries.
    seg = jnp.sort(jax.random.randint(ks[5], (b, t), 0, 4), axis=1)
  return q, k, v, do, dl, seg

def check(name, attend, q, k, v, do, dl, seg, **kw):
  def loss(fn):
    def f(q, k, v):
      out, lse = fn(q, k, v)
      # lse is -inf for a query that sees nothing; its cotangent must not make NaNs.
      return (out * do).sum() + jnp.where(jnp.isfinite(lse), lse * dl, 0.0).sum(), (out, lse)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  ref = lambda q, k, v: flash_attention_reference(q, k, v, segment_ids=seg, return_lse=True,
                                                  **kw)
  (_, (out, lse)), grads = loss(attend)(q, k, v)
  (_, (r_out, r_lse)), r_grads = loss(ref)(q, k, v)
  np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=1e-4, err_msg=name + " out")
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(r_lse), err_msg=name)
  fin = np.isfinite(r_lse)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(r_lse)[fin], atol=1e-5,
                             err_msg=name + " lse")
  for g, r, what in zip(grads, r_grads, ("dq", "dk", "dv")):
    assert np.all(np.isfinite(g)), (name, what)
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f"{name} {what}")
  print("ok", name)
"""


# Each test's cases are split: the default run keeps the suite fast (every feature at least
# once); the ``slow`` twin covers the remaining combinations.
_RING_CASES = {  # (name, devices, (b, t, h, hk, d), segments, kwargs)
    "default": """[
    ("causal_gqa_p4", 4, (2, 64, 4, 2, 16), False, dict(is_causal=True)),
    ("causal_window_segments_p4", 4, (2, 64, 4, 1, 16), True,
     dict(is_causal=True, local_window_size=(20, 3))),
    ("causal_segments_gqa_p8", 8, (1, 64, 4, 2, 8), True, dict(is_causal=True)),
]""",
    "slow": """[
    ("non_causal_p4", 4, (1, 48, 2, 2, 8), False, dict()),
    ("window_non_causal_p8", 8, (1, 64, 2, 1, 8), False, dict(local_window_size=(9, 5))),
]""",
}


@pytest.mark.parametrize("cases", ["default", pytest.param("slow", marks=pytest.mark.slow)])
def test_ring_attention_in_own_shard_map(fake_devices, cases):
  """ring_attention inside the user's shard_map: causal, non-causal, causal window,
  segments, GQA, on 4 and 8 devices, and a mesh with a second (data) axis; the in-shard
  layout moves; context_parallel_shard on rows already in the zigzag order (slow)."""
  out = fake_devices(_PRELUDE + f"SLOW = {cases == 'slow'}\nCASES = " + _RING_CASES[cases] + """
for i, (name, p, shape, segments, kw) in enumerate(CASES):
  q, k, v, do, dl, seg = inputs(i, *shape, segments)
  mesh = Mesh(np.array(jax.devices()[:p]), ("sp",))
  spec = P(None, "sp")
  def attend(q, k, v, seg=seg, kw=kw, mesh=mesh, spec=spec):
    local = lambda q, k, v, *s: ring_attention(
        q, k, v, axis_name="sp", segment_ids=s[0] if s else None, return_lse=True,
        block_q=8, block_k=8, **kw)
    args = (q, k, v) + (() if seg is None else (seg,))
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args),
                         out_specs=(spec, spec))(*args)
  check(name, attend, q, k, v, do, dl, seg, **kw)

if SLOW:
  # context_parallel_shard in the user's shard_map on rows already in the zigzag order (what
  # the data pipeline's balanced_order emits): output and gradients in that order too.
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "sp"))
  q, k, v, do, dl, seg = inputs(11, 2, 64, 4, 2, 8, True)
  perm = load_balance_permutation(64, 4, "zigzag")
  inv = np.argsort(perm)
  spec = P("data", "sp")
  shard = jax.shard_map(
      lambda q, k, v, s: context_parallel_shard(
          q, k, v, axis_name="sp", strategy="ring", load_balance="zigzag",
          token_order="balanced", is_causal=True, segment_ids=s, return_lse=True),
      mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec))
  def attend(q, k, v):
    out, lse = shard(q[:, perm], k[:, perm], v[:, perm], seg[:, perm])
    return out[:, inv], lse[:, inv]
  check("pre-permuted", attend, q, k, v, do, dl, seg, is_causal=True)
  print("ok 2d_mesh", "ok reference", "ok layouts")  # Run by the default twin.
  raise SystemExit(0)

# A 2-D mesh: batch over "data", sequence over "sp"; the ring only spans "sp".
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "sp"))
q, k, v, do, dl, seg = inputs(9, 2, 32, 2, 1, 8, True)
spec = P("data", "sp")
attend = jax.shard_map(
    lambda q, k, v, s: ring_attention(q, k, v, axis_name="sp", segment_ids=s, is_causal=True,
                                      return_lse=True),
    mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec))
check("2d_mesh", lambda q, k, v: attend(q, k, v, seg), q, k, v, do, dl, seg, is_causal=True)

# The all-gather reference computes the same thing.
mesh = Mesh(np.array(jax.devices()[:4]), ("sp",))
q, k, v, do, dl, seg = inputs(10, 1, 32, 2, 1, 8, True)
spec = P(None, "sp")
attend = jax.shard_map(
    lambda q, k, v, s: ring_attention_reference(
        q, k, v, axis_name="sp", segment_ids=s, is_causal=True, local_window_size=6,
        return_lse=True),
    mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec))
check("reference", lambda q, k, v: attend(q, k, v, seg), q, k, v, do, dl, seg,
      is_causal=True, local_window_size=6)

# The in-shard moves between the natural layout and the balanced ones are the permutation.
for p in (2, 4, 8):
  mesh = Mesh(np.array(jax.devices()[:p]), ("sp",))
  for lb in ("zigzag", "striped"):
    x = jax.random.normal(jax.random.PRNGKey(p), (2, 2 * p * p, 3))
    move = lambda f, lb=lb, p=p, mesh=mesh: jax.shard_map(
        lambda x: f(x, axis_name="sp", num_devices=p, load_balance=lb), mesh=mesh,
        in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    y = move(to_layout)(x)
    np.testing.assert_array_equal(y, x[:, load_balance_permutation(x.shape[1], p, lb)])
    np.testing.assert_array_equal(move(from_layout)(y), x)
print("ok layouts")

""")
  # Default: the cases, the 2-D mesh, the reference, the layouts; slow: pre-permuted too.
  assert out.count("ok ") == len(eval(_RING_CASES[cases])) + (4 if cases == "slow" else 3)


# Every (strategy, load balance) runs in the default suite, with the features spread over
# them; the slow twins run the full product strategy x load balance x feature.
_CP_CASES = {  # (strategy, load_balance, (b, t, h, hk, d), segments, kwargs)
    "default_ring": """[
    ("ring", None, (2, 64, 4, 2, 8), True, dict(is_causal=True)),
    ("ring", "zigzag", (2, 64, 4, 2, 16), True, dict(is_causal=True, local_window_size=(13, 0))),
    ("ring", "striped", (2, 64, 4, 1, 16), False, dict(is_causal=True, logits_soft_cap=5.0)),
    ("all_gather", None, (2, 64, 4, 2, 8), False, dict(local_window_size=(7, 3))),
]""",
    "default_others": """[
    ("all_gather", "zigzag", (2, 64, 4, 2, 8), True, dict(is_causal=True)),
    ("ulysses", None, (2, 64, 8, 4, 8), False, dict(is_causal=True, logits_soft_cap=5.0)),
    ("ulysses", "zigzag", (2, 64, 8, 4, 8), True, dict(is_causal=True)),
    ("ulysses", "striped", (2, 32, 4, 4, 8), True, dict()),
    # The Pallas (TPU) kernels in the interpreter, chunks padded to their 128-row blocks.
    ("ring", "zigzag", (1, 32, 2, 1, 8), True, dict(is_causal=True, implementation="interpret")),
]""",
}
# name: (segments, kwargs); every ring / all_gather case has GQA (4 heads, 2 kv heads).
_FEATURES = """{
    "causal": (False, dict(is_causal=True)),
    "non_causal": (False, dict()),
    "causal_window": (False, dict(is_causal=True, local_window_size=(13, 0))),
    "window": (False, dict(local_window_size=(7, 3))),
    "causal_segments": (True, dict(is_causal=True)),
    "soft_cap": (True, dict(is_causal=True, logits_soft_cap=5.0)),
}"""
_CP_CASES["slow_interpret"] = """[
    (s, lb, (1, 32, 4, 4, 8), True, dict(is_causal=True, implementation="interpret"))
    for s, lb in [("ring", None), ("ring", "striped"), ("all_gather", "zigzag"),
                  ("ulysses", None)]]"""
for _strategy, _balances in (("ring", (None, "zigzag", "striped")),
                             ("all_gather", (None, "zigzag")),
                             ("ulysses", (None, "zigzag", "striped"))):
  _shape = (2, 64, 8, 4, 8) if _strategy == "ulysses" else (1, 64, 4, 2, 8)
  _CP_CASES["slow_" + _strategy] = (
      "[(s, lb, %r, seg, kw) for s in [%r] for lb in %r for seg, kw in %s.values()]"
      % (_shape, _strategy, _balances, _FEATURES))


@pytest.mark.parametrize("cases", ["default_ring", "default_others"] + [
    pytest.param(c, marks=pytest.mark.slow) for c in _CP_CASES if c.startswith("slow")])
def test_context_parallel_strategies(fake_devices, cases):
  """context_parallel_attention on global arrays: each strategy and load balance (with
  causal / non-causal / windows / segments / GQA / soft cap spread over the default cases,
  all combinations in the slow ones), on a (data=2, context=4) mesh; bad configurations
  raise clear ValueErrors."""
  out = fake_devices(_PRELUDE + f"ERRORS = {cases == 'default_ring'}\nCASES = " +
                     _CP_CASES[cases] + """
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context"))
for i, (strategy, lb, shape, segments, kw) in enumerate(CASES):
  q, k, v, do, dl, seg = inputs(20 + i, *shape, segments)
  attend = lambda q, k, v, seg=seg, strategy=strategy, lb=lb, kw=kw: (
      context_parallel_attention(q, k, v, mesh=mesh, strategy=strategy, load_balance=lb,
                                 segment_ids=seg, return_lse=True, **kw))
  kw = {name: value for name, value in kw.items() if name != "implementation"}
  check(f"{strategy}_{lb}_{sorted(kw)}", attend, q, k, v, do, dl, seg, **kw)

if not ERRORS:
  print("ok errors")  # Checked by the default_ring twin.
  raise SystemExit(0)

# Bad configurations fail before any compile, with a message that says what to change.
def raises(match, fn):
  try:
    fn()
  except ValueError as e:
    assert match in str(e), (match, str(e))
  else:
    raise AssertionError("no ValueError for " + match)

q, k, v, *_ = inputs(0, 1, 20, 4, 2, 8, False)
cp = lambda **kw: context_parallel_attention(q, k, v, mesh=mesh, **kw)
raises("divisible by 2 x the size of axis 'context' (8", lambda: cp(load_balance="zigzag"))
raises("num_kv_heads (2) must both be divisible", lambda: cp(strategy="ulysses"))
raises("strategy must be one of", lambda: cp(strategy="tree"))
raises("load_balance must be one of", lambda: cp(load_balance="random"))
raises("not an axis of the mesh", lambda: cp(axis_name="sp"))
raises("supports load_balance None or 'zigzag'",
       lambda: cp(strategy="all_gather", load_balance="striped"))
raises("divisible by the square of the size of axis 'context' (4^2 = 16)",
       lambda: jax.shard_map(lambda q, k, v: context_parallel_shard(
           q, k, v, axis_name="context", load_balance="striped"), mesh=mesh,
           in_specs=(P(None, "context"),) * 3, out_specs=P(None, "context"))(
               *inputs(0, 1, 24, 2, 2, 8, False)[:3]))
raises("token_order='balanced' needs a load_balance",
       lambda: jax.shard_map(lambda q, k, v: context_parallel_shard(
           q, k, v, axis_name="context", token_order="balanced"), mesh=mesh,
           in_specs=(P(None, "context"),) * 3, out_specs=P(None, "context"))(q, q, q))
q30 = jnp.zeros((1, 30, 4, 8))
raises("sequence length 30 must be divisible by the size of axis 'context' (4)",
       lambda: context_parallel_attention(q30, q30, q30, mesh=mesh))
# Inside shard_map: an axis that is not bound, mismatched local lengths.
spec = P(None, "context")
raises("is not a mesh axis bound here", lambda: jax.shard_map(
    lambda q, k, v: ring_attention(q, k, v, axis_name="sp"), mesh=mesh,
    in_specs=(spec,) * 3, out_specs=spec)(q, k, v))
raises("same number of local tokens", lambda: jax.shard_map(
    lambda q, k, v: ring_attention(q, k, v, axis_name="context"), mesh=mesh,
    in_specs=(spec, P(), P()), out_specs=spec)(q, k, v))
print("ok errors")
""")
  assert out.count("ok ") == len(eval(_CP_CASES[cases])) + 1


def test_outside_shard_map_is_a_clear_error():
  q = jnp.zeros((1, 16, 2, 8))
  with pytest.raises(ValueError, match="inside jax.shard_map"):
    ring_attention(q, q, q, axis_name="context")
  with pytest.raises(ValueError, match="num_kv_heads"):
    ring_attention(q, jnp.zeros((1, 16, 3, 8)), jnp.zeros((1, 16, 3, 8)), axis_name="context")


@pytest.mark.parametrize("implementation", ["xla", "gpu_interpret"])
def test_partials_are_float32(monkeypatch, implementation):
  """bf16 ring attention: every per-pair kernel call returns its partial output and its
  partial gradients in float32 (the merge never sees values rounded to bf16), for the
  [B, H, T, D] (XLA) and [B, T, H, D] (GPU kernels, interpreted) layouts; the result still
  matches the reference. One device: the ring is one step, so this runs in-process."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  from pallas_kernels._common import dispatch
  from pallas_kernels.flash_attention import backends
  backend = "xla" if implementation == "xla" else "gpu"
  module = backends.backend_spec(backend).module
  seen = []
  forward, backward = module.flash_forward, module.flash_backward

  def record(fn, what):
    def wrapped(*args, **kwargs):
      results = fn(*args, **kwargs)
      seen.append((what, [r.dtype for r in results[:1 if what == "out" else 3]]))
      return results
    return wrapped

  if backend == "gpu":  # On this CPU host "interpret" would otherwise pick the TPU kernels.
    monkeypatch.setattr(dispatch, "pallas_backend", lambda platform: "gpu")
  monkeypatch.setattr(module, "flash_forward", record(forward, "out"))
  monkeypatch.setattr(module, "flash_backward", record(backward, "grads"))
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(ks[0], (1, 20, 4, 24)).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, 20, 2, 24)).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, 20, 2, 24)).astype(jnp.bfloat16)
  mesh = Mesh(np.array(jax.devices()[:1]), ("sp",))
  impl = "xla" if backend == "xla" else "interpret"

  def loss(q, k, v):
    out = jax.shard_map(
        lambda q, k, v: ring_attention(q, k, v, axis_name="sp", is_causal=True,
                                       implementation=impl, block_q=16, block_k=16),
        mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"),
        # jax's Pallas interpreter pads partial blocks with a `pad` that the varying-axes
        # check rejects (an interpreter limitation; compiled kernels are not affected).
        check_vma=backend != "gpu")(q, k, v)
    return (out.astype(jnp.float32) ** 2).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v)
  assert seen and all(d == jnp.float32 for _, dtypes in seen for d in dtypes), seen
  assert {w for w, _ in seen} == {"out", "grads"}
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  from pallas_kernels import flash_attention_reference
  ref = flash_attention_reference(q, k, v, is_causal=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=3e-3, rtol=1e-2)
