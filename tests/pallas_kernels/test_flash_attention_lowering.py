"""flash_attention lowers for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does;
a primitive or layout the lowering rejects fails here. (The final device compilation —
Mosaic's layout passes, Triton -> PTX — still needs the hardware.) Each case lowers the
forward and the backward of the public op, traced for the target platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from pallas_kernels import flash_attention, masks


CASES = {
    "mha_causal": dict(shape=(2, 1024, 1024, 8, 8, 128), is_causal=True),
    "gqa_segments_soft_cap": dict(shape=(1, 1000, 1000, 8, 2, 128), is_causal=True,
                                  segments=True, logits_soft_cap=50.0),
    "mqa_cross_head_dim_64": dict(shape=(1, 256, 2048, 4, 1, 64), is_causal=True),
    "head_dim_80_non_causal": dict(shape=(1, 500, 700, 4, 4, 80)),
    # Sparse masks: the block-skip metadata drives the kernels' loops and index maps.
    "gqa_causal_window_sinks_2048": dict(shape=(1, 2048, 2048, 8, 2, 128), is_causal=True,
                                         mask_kwargs=dict(local_window_size=256,
                                                          num_sink_tokens=4)),
    "per_head_windows_gqa": dict(shape=(1, 1000, 1000, 4, 2, 64), mask_kwargs=dict(
        mask=masks.per_head_windows([None, 128, (64, 64), 128]))),
    "chunked_segments_q_shorter": dict(shape=(1, 300, 1100, 4, 1, 128), is_causal=True,
                                       segments=True, mask_kwargs=dict(chunk_size=256)),
    # Shifted causal (keys at distance >= 256) & sinks: LM-Infinite's far pass.
    "far_sinks_shifted_causal": dict(shape=(1, 1000, 1000, 4, 2, 64), mask_kwargs=dict(
        mask=masks.SinkMask(4) & masks.CausalMask(256) | masks.CausalMask(600))),
}


def _export(platform, case, dtype, with_backward):
  b, tq, tk, h, hk, d = case["shape"]
  kwargs = dict(is_causal=case.get("is_causal", False),
                logits_soft_cap=case.get("logits_soft_cap"), implementation="pallas",
                **case.get("mask_kwargs", {}))
  args = [jax.ShapeDtypeStruct((b, tq, h, d), dtype),
          jax.ShapeDtypeStruct((b, tk, hk, d), dtype),
          jax.ShapeDtypeStruct((b, tk, hk, d), dtype)]
  if case.get("segments"):
    args += [jax.ShapeDtypeStruct((b, tq), jnp.int32), jax.ShapeDtypeStruct((b, tk), jnp.int32)]

  def attention(q, k, v, *segs):
    return flash_attention(q, k, v, segment_ids=tuple(segs) or None, **kwargs)

  def loss(q, k, v, *segs):
    return jnp.sum(attention(q, k, v, *segs).astype(jnp.float32) ** 2)

  fn = jax.grad(loss, argnums=(0, 1, 2)) if with_backward else attention
  return export_mlir(fn, args, platform)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower(platform, case, dtype):
  forward = _export(platform, CASES[case], dtype, with_backward=False)
  assert forward.count(CUSTOM_CALL[platform]) >= 1
  backward = _export(platform, CASES[case], dtype, with_backward=True)
  # forward (recomputed for the residuals) + the dK/dV and dQ kernels.
  assert backward.count(CUSTOM_CALL[platform]) >= 3
