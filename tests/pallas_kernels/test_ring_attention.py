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
  segments, GQA, on 4 and 8 devices, and a mesh with a second (data) axis."""
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
  print("ok 2d_mesh", "ok reference")  # Run by the default twin only.
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
""")
  assert out.count("ok ") == len(eval(_RING_CASES[cases])) + 2


_CP_CASES = {  # (strategy, load_balance, (b, t, h, hk, d), segments, kwargs)
    "default": """[
    ("ring", "zigzag", (2, 64, 4, 2, 16), True, dict(is_causal=True)),
    ("ring", "striped", (2, 64, 4, 1, 16), False,
     dict(is_causal=True, local_window_size=(13, 0))),
    ("all_gather", None, (2, 64, 4, 2, 16), True, dict(is_causal=True)),
    ("ulysses", "zigzag", (2, 64, 8, 4, 8), True, dict(is_causal=True)),
]""",
    "slow": """[
    ("ring", None, (2, 64, 4, 2, 8), True, dict(local_window_size=(11, 2))),
    ("ring", "striped", (2, 32, 2, 2, 8), True, dict(local_window_size=(5, 6))),
    ("all_gather", "zigzag", (2, 64, 4, 2, 8), False, dict(local_window_size=(7, 3))),
    ("ulysses", None, (2, 32, 4, 4, 8), False, dict()),
    ("ulysses", "striped", (2, 32, 4, 4, 8), True, dict(is_causal=True)),
]""",
}


@pytest.mark.parametrize("cases", ["default", pytest.param("slow", marks=pytest.mark.slow)])
def test_context_parallel_strategies(fake_devices, cases):
  """context_parallel_attention on global arrays: each strategy and load balance (with
  causal / window / segments / GQA spread over the cases), on a (data=2, context=4) mesh;
  bad configurations raise clear ValueErrors."""
  out = fake_devices(_PRELUDE + "CASES = " + _CP_CASES[cases] + """
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context"))
for i, (strategy, lb, shape, segments, kw) in enumerate(CASES):
  q, k, v, do, dl, seg = inputs(20 + i, *shape, segments)
  attend = lambda q, k, v, seg=seg, strategy=strategy, lb=lb, kw=kw: (
      context_parallel_attention(q, k, v, mesh=mesh, strategy=strategy, load_balance=lb,
                                 segment_ids=seg, return_lse=True, **kw))
  check(f"{strategy}_{lb}", attend, q, k, v, do, dl, seg, **kw)

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


def test_per_device_ring_lowers_for_tpu():
  """The per-device ring (forward and backward) lowers to Mosaic with jax.export: one kernel
  call per visible relative offset, and K/V moving by collective permutes. (Pallas kernels
  inside a shard_map with check_vma=True, and the CUDA lowering, are not covered yet.)"""
  import jax
  from jax.sharding import AbstractMesh, PartitionSpec

  from pallas_kernels._common import dispatch

  mesh, spec = AbstractMesh((4,), ("sp",)), PartitionSpec(None, "sp")

  def attend(q, k, v):
    return jax.shard_map(
        lambda q, k, v: ring_attention(q, k, v, axis_name="sp", is_causal=True,
                                       implementation="pallas"),
        mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)

  def loss(q, k, v):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)

  args = [jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)]
  with dispatch.target_platform("tpu"):
    forward = jax.export.export(jax.jit(attend), platforms=["tpu"])(*args).mlir_module()
    backward = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
                                 platforms=["tpu"])(*args).mlir_module()
  # Causal, 4 devices: offsets 0..3 are visible (4 forward kernels, counted once per call
  # site: the ring loop and its last step), the negative ones are skipped.
  assert forward.count("tpu_custom_call") == 8
  assert forward.count("collective_permute") >= 1
  assert backward.count("tpu_custom_call") >= 16
  assert backward.count("collective_permute") >= 3
