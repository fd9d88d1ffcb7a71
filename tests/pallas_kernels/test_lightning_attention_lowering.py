"""lightning_attention lowers for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does;
a primitive or layout the lowering rejects fails here. (The final device compilation —
Mosaic's layout passes, Triton -> PTX — still needs the hardware.) Each case lowers the
forward and the backward (all gradients, the initial state's included) of the public op at
realistic sizes, traced for the target platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._common import dispatch
from pallas_kernels.lightning_attention import lightning_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": TRITON_CALL}

# (batch, seq, heads, d_k, d_v)
CASES = {
    "seq2048_d128_initial_state": dict(shape=(2, 2048, 4, 128, 128), state=True),
    "seq4096_d64_segments": dict(shape=(1, 4096, 8, 64, 64), segments=True),
    "seq1100_dk40_dv80_segments_state": dict(shape=(1, 1100, 2, 40, 80), state=True,
                                             segments=True),
}


def _export(platform, case, dtype, with_backward, decay_argument=False):
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
  fn = jax.grad(loss, argnums=argnums) if with_backward else attention
  disabled = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
              if platform == "cuda" else [])
  with dispatch.target_platform("gpu" if platform == "cuda" else platform):
    exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=disabled)(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower(platform, case, dtype):
  forward = _export(platform, CASES[case], dtype, with_backward=False)
  assert forward.count(CUSTOM_CALL[platform]) == 1
  backward = _export(platform, CASES[case], dtype, with_backward=True)
  # The forward (for the residuals) + the dQ and the dK/dV kernels.
  assert backward.count(CUSTOM_CALL[platform]) == 3


@pytest.mark.parametrize("platform", ["tpu", "cuda"], ids=["to_tpu", "to_cuda"])
def test_decay_gradient_lowers(platform):
  """With the decay as an argument its gradient (XLA, forward mode) lowers beside the
  kernels, which stay the same three."""
  backward = _export(platform, CASES["seq1100_dk40_dv80_segments_state"], jnp.bfloat16,
                     with_backward=True, decay_argument=True)
  assert backward.count(CUSTOM_CALL[platform]) == 3
