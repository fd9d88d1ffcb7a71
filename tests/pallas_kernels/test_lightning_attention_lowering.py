"""lightning_attention lowers for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does;
a primitive or layout the lowering rejects fails here. Each case lowers the forward and the
backward (all gradients, the initial state's included) of the public op at realistic sizes,
traced for the target platform. With a libtpu wheel at hand (``LCLM_LIBTPU_PATH``), the TPU
kernels are also compiled by Mosaic for v4, v5e and v6e (``libtpu_compile.py``: layouts and
VMEM, no TPU needed); Triton -> PTX still needs a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from libtpu_compile import TOPOLOGIES, compile_programs, requires_libtpu
from pallas_kernels.lightning_attention import lightning_attention


# (batch, seq, heads, d_k, d_v)
CASES = {
    "seq2048_d128_initial_state": dict(shape=(2, 2048, 4, 128, 128), state=True),
    "seq4096_d64_segments": dict(shape=(1, 4096, 8, 64, 64), segments=True),
    "seq1100_dk40_dv80_segments_state": dict(shape=(1, 1100, 2, 40, 80), state=True,
                                             segments=True),
}


def _programs(case, dtype, decay_argument=False):
  """The public op's forward and its gradient (q, k, v, initial state and, with
  ``decay_argument``, the decay) as (label, fn, args)."""
  b, t, h, dk, dv = case["shape"]
  args = [jax.ShapeDtypeStruct((b, t, h, dk), dtype), jax.ShapeDtypeStruct((b, t, h, dk), dtype),
          jax.ShapeDtypeStruct((b, t, h, dv), dtype),
          jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)]
  if case.get("segments"):
    args.append(jax.ShapeDtypeStruct((b, t), jnp.int32))
  if decay_argument:
    args.append(jax.ShapeDtypeStruct((h,), jnp.float32))
  use_state = case.get("state", False)

  def attention(q, k, v, s0, *rest):
    seg = rest[0] if case.get("segments") else None
    decay = rest[-1] if decay_argument else jnp.linspace(0.9, 0.999, h)
    return lightning_attention(q, k, v, decay=decay, initial_state=s0 if use_state else None,
                               return_final_state=True, segment_ids=seg,
                               implementation="pallas")

  def loss(q, k, v, s0, *rest):
    out, final = attention(q, k, v, s0, *rest)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(final ** 2)

  argnums = (0, 1, 2, 3) + ((len(args) - 1,) if decay_argument else ())
  return [("forward", attention, args), ("backward", jax.grad(loss, argnums=argnums), args)]


def _export(platform, case, dtype, with_backward, decay_argument=False):
  programs = {label: (fn, args) for label, fn, args in _programs(case, dtype, decay_argument)}
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
  # SSD's scalar-decay kernels: the forward (saving states for the residuals) and the
  # backward.
  assert backward.count(CUSTOM_CALL[platform]) == 2 * FORWARD_KERNELS[platform]


@pytest.mark.parametrize("platform", ["tpu", "cuda"], ids=["to_tpu", "to_cuda"])
def test_decay_gradient_lowers(platform):
  """With the decay as an argument its gradient (the kernels' per-token log-decay gradient,
  summed) lowers with the same kernels."""
  backward = _export(platform, CASES["seq1100_dk40_dv80_segments_state"], jnp.bfloat16,
                     with_backward=True, decay_argument=True)
  assert backward.count(CUSTOM_CALL[platform]) == 2 * FORWARD_KERNELS[platform]


# Mosaic compiles (libtpu_compile.py): MiniMax-01's geometry (64 heads of 128) at 8K tokens,
# and the awkward head dims.
COMPILE_CASES = {
    "minimax_8k_64_heads_d128": dict(shape=(1, 8192, 64, 128, 128), state=True, segments=True),
    "seq1100_dk40_dv80_segments_state": CASES["seq1100_dk40_dv80_segments_state"],
}


def tpu_programs(case):
  """For libtpu_compile: forward and backward of ``case`` in bfloat16 and float32."""
  return [(f"{dtype.__name__} {label}", fn, args) for dtype in (jnp.bfloat16, jnp.float32)
          for label, fn, args in _programs(COMPILE_CASES[case], dtype)]


@pytest.mark.slow  # about a minute on 2 cores
@requires_libtpu
def test_tpu_kernels_compile_with_mosaic():
  compiled = compile_programs("test_lightning_attention_lowering", COMPILE_CASES)
  assert len(compiled) == len(TOPOLOGIES) * len(COMPILE_CASES) * 4, compiled
