"""ssd lowers for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does;
a primitive or layout the lowering rejects fails here. Each case lowers the forward and the
backward (all gradients) of the public op at realistic sizes, traced for the target
platform. With a libtpu wheel at hand (``LCLM_LIBTPU_PATH``), the TPU kernels are also
compiled by Mosaic for v4, v5e and v6e (``libtpu_compile.py``: layouts and VMEM, no TPU
needed); Triton -> PTX still needs a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from libtpu_compile import TOPOLOGIES, compile_programs, requires_libtpu
from pallas_kernels.ssd import ssd


# (batch, seq, heads, head_dim, n_groups, d_state) and options.
CASES = {
    # Mamba-2 (2.7B-like head geometry): head_dim 64, d_state 128, one group; the GPU
    # kernels with whole head_dim tiles (the default splits head_dim for small batch*heads).
    "mamba2_4k": dict(shape=(1, 4096, 8, 64, 1, 128), block_head_dim=64),
    # Packed rows, grouped B/C, d_state 64, initial state and gate.
    "segments_groups_2k": dict(shape=(2, 2048, 8, 64, 2, 64), segments=True, extras=True),
    # Awkward sizes: padded length, head_dim and d_state; larger chunks.
    "odd_sizes_long_chunks": dict(shape=(1, 1000, 3, 40, 1, 12), extras=True,
                                  chunk={"tpu": 256, "cuda": 128}),
    # head_dim 128 (the GPU default: eight tiles of 16).
    "head_dim_128": dict(shape=(1, 2048, 4, 128, 1, 128), segments=True),
}


def _forward_and_gradient(platform, case, dtype):
  """The public op's forward and its gradient (every argument) as (label, fn, args)."""
  b, t, h, p, g, n = case["shape"]
  f32 = jnp.float32
  specs = dict(x=jax.ShapeDtypeStruct((b, t, h, p), dtype),
               dt=jax.ShapeDtypeStruct((b, t, h), f32), A=jax.ShapeDtypeStruct((h,), f32),
               B=jax.ShapeDtypeStruct((b, t, g, n), dtype),
               C=jax.ShapeDtypeStruct((b, t, g, n), dtype))
  if case.get("extras"):
    specs.update(D=jax.ShapeDtypeStruct((h,), f32), dt_bias=jax.ShapeDtypeStruct((h,), f32),
                 z=jax.ShapeDtypeStruct((b, t, h, p), dtype),
                 initial_states=jax.ShapeDtypeStruct((b, h, p, n), f32))
  segments = jax.ShapeDtypeStruct((b, t), jnp.int32) if case.get("segments") else None
  chunk = case.get("chunk", {}).get(platform)

  def forward(arrays, segment_ids):
    return ssd(**arrays, dt_softplus=True, segment_ids=segment_ids, chunk_size=chunk,
               block_head_dim=case.get("block_head_dim"), return_final_states=True,
               implementation="pallas")

  def loss(arrays, segment_ids):
    y, final = forward(arrays, segment_ids)
    return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final ** 2)

  return [("forward", forward, (specs, segments)), ("backward", jax.grad(loss), (specs, segments))]


def _export(platform, case, dtype, with_backward):
  programs = {label: (fn, args) for label, fn, args in _forward_and_gradient(platform, case, dtype)}
  fn, args = programs["backward" if with_backward else "forward"]
  return export_mlir(fn, args, platform)


# Pallas calls per pass: TPU one kernel; GPU chunk states, state passing, chunk output (the
# backward: chunk state cotangents, reverse passing, chunk gradients).
FORWARD_KERNELS = {"tpu": 1, "cuda": 3}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower(platform, case, dtype):
  forward = _export(platform, CASES[case], dtype, with_backward=False)
  assert forward.count(CUSTOM_CALL[platform]) == FORWARD_KERNELS[platform]
  backward = _export(platform, CASES[case], dtype, with_backward=True)
  # The forward (with the per-chunk states for the residuals) and the backward kernel.
  assert backward.count(CUSTOM_CALL[platform]) == 2 * FORWARD_KERNELS[platform]


# Mosaic compiles (libtpu_compile.py): the realistic sizes, plus the awkward ones.
COMPILE_CASES = {
    # Mamba-2 at 8K tokens: 64 heads of head_dim 64, d_state 128, one group, everything on.
    "mamba2_8k_64_heads": dict(shape=(1, 8192, 64, 64, 1, 128), segments=True, extras=True),
    # Eight groups of B/C (Nemotron-H-like), no options.
    "groups8_8k_64_heads": dict(shape=(1, 8192, 64, 64, 8, 128)),
    "odd_sizes_long_chunks": CASES["odd_sizes_long_chunks"],
}


def tpu_programs(case):
  """For libtpu_compile: forward and backward of ``case`` in bfloat16 and float32."""
  return [(f"{dtype.__name__} {label}", fn, args) for dtype in (jnp.bfloat16, jnp.float32)
          for label, fn, args in _forward_and_gradient("tpu", COMPILE_CASES[case], dtype)]


@pytest.mark.slow  # about 4 minutes on 2 cores
@requires_libtpu
def test_tpu_kernels_compile_with_mosaic():
  compiled = compile_programs("test_ssd_lowering", COMPILE_CASES)
  assert len(compiled) == len(TOPOLOGIES) * len(COMPILE_CASES) * 4, compiled
