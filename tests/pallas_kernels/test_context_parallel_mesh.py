"""Entries that take a mesh work whatever its axis types (issue 18, item 10).

``jax.make_mesh`` gives Explicit axes (the sharding is part of each array's type; jax 0.10's
default), ``jax.sharding.Mesh`` Auto axes; a mesh may mix them. On 8 fake CPU devices, in one
subprocess, for Explicit and mixed (data=2, context=4) meshes (Auto ones: test_ring_attention.py),
each strategy and load balance, eager
and under ``jax.jit``: ``context_parallel_attention`` matches ``flash_attention_reference``
(float32) within the GUIDE's tolerances, with the documented output sharding
``P("data", "context")``; gradients (dq, dk, dv, through the output and the lse) for one
strategy per mesh; inputs given unsharded, sharded another way (heads split) or already in
place. ``lclm.sharding.make_mesh`` builds Auto axes, and the lclm.sharding helpers that take a
mesh accept one with Explicit axes. The default suite runs one strategy per mesh (ring with
gradients on the Explicit mesh, Ulysses on the mixed one); the slow case runs them all.
"""

from __future__ import annotations

import pytest

_CODE = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from pallas_kernels import context_parallel_attention, flash_attention_reference
assert jax.device_count() == 8
E, A = AxisType.Explicit, AxisType.Auto
FULL = None  # Filled in by the test.

MESHES = {
    "explicit": jax.make_mesh((2, 4), ("data", "context"), axis_types=(E, E)),
    "mixed": jax.make_mesh((2, 4), ("data", "context"), axis_types=(A, E)),
}
# Auto meshes (jax.sharding.Mesh) run every strategy and layout in test_ring_attention.py.
assert Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context")).axis_types == (A, A)
# Per mesh: each strategy as (strategy, load_balance, seq), the load balances spread over the
# meshes (every layout is checked on Auto meshes by test_ring_attention.py). Striped over 40
# tokens (10 per device, not divisible by 4) takes the global permutation path: a gather
# along the sequence before and after shard_map. Gradients: the first case of a mesh.
CASES = {
    "explicit": [("ring", "zigzag", 64), ("all_gather", "zigzag", 64), ("ulysses", None, 64)],
    "mixed": [("ring", "striped", 40), ("all_gather", None, 64), ("ulysses", None, 64)],
}
GRADS = ("explicit", "mixed")
if not FULL:  # The default suite: one strategy per mesh, one layout each, gradients once.
  CASES = {"explicit": CASES["explicit"][:1], "mixed": CASES["mixed"][2:]}
  GRADS = ("explicit",)
B, H, D = 2, 4, 16  # Ulysses splits the 4 heads over the 4 context devices.

def inputs(seed, t):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q, k, v, do = (jax.random.normal(kk, (B, t, H, D), jnp.float32) for kk in ks[:4])
  return q, k, v, do, jax.random.normal(ks[4], (B, t, H), jnp.float32)

def close(name, got, want, atol, rtol):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=rtol,
                             err_msg=name)

refs = {t: (inputs(t, t), flash_attention_reference(*inputs(t, t)[:3], is_causal=True,
                                                     return_lse=True)) for t in (40, 64)}
checked = 0
for kind, mesh in MESHES.items():
  want_sharding = NamedSharding(mesh, P("data", "context"))
  for i, (strategy, lb, t) in enumerate(CASES[kind]):
    (q, k, v, do, dl), (r_out, r_lse) = refs[t]
    layout = i if FULL else {"explicit": 0, "mixed": 2}[kind]
    if layout == 1:  # Inputs sharded another way (heads split over the context axis).
      q, k, v = jax.device_put((q, k, v), NamedSharding(mesh, P(None, None, "context")))
    elif layout == 2:  # Inputs already where shard_map wants them.
      q, k, v = jax.device_put((q, k, v), want_sharding)
    attend = lambda q, k, v, s=strategy, lb=lb, mesh=mesh: context_parallel_attention(
        q, k, v, mesh=mesh, strategy=s, load_balance=lb, is_causal=True, return_lse=True,
        implementation="xla")
    for mode, fn in (("eager", attend), ("jit", jax.jit(attend))):
      name = f"{kind} {strategy} {lb} t={t} {mode}"
      out, lse = fn(q, k, v)
      close(name + " out", out, r_out, 2e-5, 1e-4)
      close(name + " lse", lse, r_lse, 1e-5, 0)
      # The documented sharding: the type along Explicit axes (on Auto axes, after a global
      # permutation, XLA chooses freely).
      if t == 64 or kind == "explicit":
        assert out.sharding.is_equivalent_to(want_sharding, 4), (name, out.sharding)
      if kind == "explicit":
        spec = jax.typeof(out).sharding.spec
        assert spec == P("data", "context", None, None), (name, spec)
      checked += 1
    if i == 0 and kind in GRADS:  # Through the output and the lse, under jit.
      def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: sum(
            (x * w).sum() for x, w in zip(fn(q, k, v), (do, dl))), argnums=(0, 1, 2)))
      grads = loss(attend)(q, k, v)
      r_grads = loss(lambda q, k, v: flash_attention_reference(
          q, k, v, is_causal=True, return_lse=True))(q, k, v)
      for g, r, what in zip(grads, r_grads, ("dq", "dk", "dv")):
        close(f"{name} {what}", g, r, 1e-4, 1e-4)
  print("ok", kind)

assert checked == sum(map(len, CASES.values())) * 2, checked

# lclm.sharding: make_mesh builds Auto axes (the pjit model the models are written for); the
# helpers that take a mesh accept an Explicit one and work on its Auto twin.
from layers.partitioning import constrain_activation, shard_kernel
from lclm import sharding
mesh = sharding.make_mesh(data=2, context=4)
assert mesh.axis_types == (A,) * 4, mesh.axis_types
assert sharding.auto_axes(mesh) is mesh
explicit = jax.make_mesh((2, 1, 1, 4), sharding.MESH_AXES, axis_types=(E,) * 4)
twin = sharding.auto_axes(explicit)
assert twin.axis_types == (A,) * 4 and twin.devices.tolist() == explicit.devices.tolist()
tokens = np.arange(2 * 64, dtype=np.int32).reshape(2, 64)
placed = sharding.shard_batch({"inputs": tokens}, explicit)["inputs"]
assert placed.sharding.is_equivalent_to(NamedSharding(explicit, P(("data", "fsdp"), "context")),
                                        2), placed.sharding
np.testing.assert_array_equal(placed, tokens)
state = sharding.named_shardings({"count": jnp.zeros(())}, explicit)
assert state["count"].mesh.axis_types == (A,) * 4
(q, *_), _ = refs[64]
axes = ("batch", "length", None, None)

@jax.jit
def per_shard(x):  # A kernel call and an activation constraint of the layers.
  with sharding.activation_sharding(explicit):
    x = constrain_activation(x, axes)
    return shard_kernel(lambda a: a * jax.lax.axis_size("context"), (x,), (axes,), axes)
np.testing.assert_allclose(per_shard(q), q * 4)
print("ok lclm")
"""


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_entries_taking_a_mesh_work_with_every_axis_type(fake_devices, full):
  out = fake_devices(_CODE.replace("FULL = None", f"FULL = {full}"))
  assert out.split() == ["ok", "explicit", "ok", "mixed", "ok", "lclm"], out
