"""Ring attention and every context-parallel strategy lower for TPU (Mosaic) and GPU (Triton).

From this CPU-only machine, with ``jax.export``: the per-device kernels (forward and
backward in one module: the gradient of a loss next to the output) inside a ``shard_map``
over an abstract (data=2, context=4) mesh that carries the target's abstract device
(``pallas_kernels._common.sharding.lowering_mesh``; ``dispatch.target_platform`` alone
installs a one-device mesh that the shard_map rejects). The assertions count the kernel
custom calls and the collectives each strategy must use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, TRITON_CALL
from pallas_kernels import context_parallel_attention, ring_attention
from pallas_kernels._common import sharding

KERNEL_NAMES = {"tpu": ("lclm_flash_fwd", "lclm_flash_dkv", "lclm_flash_dq"),
                "cuda": ("flash_attention_forward", "flash_attention_dkdv", "flash_attention_dq")}
# Test ids: a bare "tpu" id would mark the tests as needing a TPU (tests/conftest.py).
PLATFORMS = pytest.mark.parametrize("platform", ["tpu", "cuda"], ids=["to_tpu", "to_cuda"])
MESH = ((2, 4), ("data", "context"))


def _export(platform, fn, args):
  disabled = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
              if platform == "cuda" else [])

  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) ** 2)

  both = lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a))  # noqa: E731
  return jax.export.export(jax.jit(both), platforms=[platform],
                           disabled_checks=disabled)(*args).mlir_module()


def _args(b, t, h, hk, d, dtype=jnp.bfloat16, segments=False):
  args = [jax.ShapeDtypeStruct((b, t, h, d), dtype), jax.ShapeDtypeStruct((b, t, hk, d), dtype),
          jax.ShapeDtypeStruct((b, t, hk, d), dtype)]
  return args + ([jax.ShapeDtypeStruct((b, t), jnp.int32)] if segments else [])


@PLATFORMS
def test_ring_attention_in_own_shard_map_lowers(platform):
  """The user's shard_map, causal with GQA and segments: one kernel per visible relative
  offset (the diagonal and the unmasked pairs below it), K/V moving by collective
  permutes, in the forward and in the backward pass."""
  spec = jax.sharding.PartitionSpec("data", "context")
  with sharding.lowering_mesh("gpu" if platform == "cuda" else platform, *MESH) as mesh:
    def attend(q, k, v, seg):
      return jax.shard_map(
          lambda q, k, v, s: ring_attention(q, k, v, axis_name="context", is_causal=True,
                                            segment_ids=s, implementation="pallas"),
          mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(q, k, v, seg)

    module = _export(platform, attend, _args(2, 2048, 4, 2, 128, segments=True))
  # Two branches (the diagonal pair and the unmasked pairs below it), each with its
  # forward, dK/dV and dQ kernels (TPU repeats them per call site, GPU outlines them once).
  assert module.count(CUSTOM_CALL[platform]) >= 6
  assert all(name in module for name in KERNEL_NAMES[platform])
  # K/V in the forward; K/V and their dK/dV in the backward.
  assert module.count("collective_permute") >= 3


# (strategy, load_balance, heads, kv heads, the collective its communication needs)
CASES = [
    ("ring", None, 4, 2, "collective_permute"),
    ("ring", "zigzag", 4, 2, "collective_permute"),
    ("ring", "striped", 4, 1, "all_to_all"),  # all_to_all: the move to the striped layout
    ("all_gather", None, 4, 2, "all_gather"),
    ("all_gather", "zigzag", 4, 2, "all_gather"),
    ("ulysses", None, 8, 4, "all_to_all"),
    ("ulysses", "zigzag", 8, 4, "all_to_all"),
    ("ulysses", "striped", 8, 4, "all_to_all"),
]


@PLATFORMS
@pytest.mark.parametrize("strategy,load_balance,heads,kv_heads,collective", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_strategy_lowers(platform, strategy, load_balance, heads, kv_heads, collective):
  def lower(load_balance):
    with sharding.lowering_mesh("gpu" if platform == "cuda" else platform, *MESH) as mesh:
      def attend(q, k, v):
        return context_parallel_attention(
            q, k, v, mesh=mesh, strategy=strategy, load_balance=load_balance, is_causal=True,
            local_window_size=(700, 0), implementation="pallas")

      return _export(platform, attend, _args(2, 2048, heads, kv_heads, 128))

  module = lower(load_balance)
  assert module.count(CUSTOM_CALL[platform]) >= 3
  assert all(name in module for name in KERNEL_NAMES[platform])  # forward, dK/dV, dQ
  assert collective in module, (strategy, load_balance)
  if strategy == "ring" and load_balance == "zigzag":
    # The moves into and out of the zigzag layout add permutes to the ring's own.
    assert module.count("collective_permute") > lower(None).count("collective_permute")


def test_pallas_call_in_checked_shard_map_needs_a_varying_out_shape():
  """Why context_parallel_attention still turns shard_map's check_vma off for Pallas: under
  check_vma=True jax refuses a pallas_call whose out_shape does not declare the manual axes
  its output varies over. ``sharding.varying_shape`` declares them (the flash kernels do
  not use it yet); with it a Mosaic kernel lowers in a checked shard_map."""
  from jax.experimental import pallas as pl
  from jax.sharding import PartitionSpec

  def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  def lower(shape_of):
    with sharding.lowering_mesh("tpu", (2,), ("sp",)) as mesh:
      fn = jax.shard_map(lambda x: pl.pallas_call(double, out_shape=shape_of(x))(x),
                         mesh=mesh, in_specs=PartitionSpec("sp"),
                         out_specs=PartitionSpec("sp"), check_vma=True)
      return jax.export.export(jax.jit(fn), platforms=["tpu"])(
          jax.ShapeDtypeStruct((16, 128), jnp.float32)).mlir_module()

  with pytest.raises(ValueError, match="manual_axis_type"):
    lower(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert "tpu_custom_call" in lower(lambda x: sharding.varying_shape(x.shape, x.dtype, x))
  # Outside shard_map it is a plain ShapeDtypeStruct.
  assert sharding.varying_shape((2,), jnp.float32, jnp.zeros(2)).manual_axis_type is None
