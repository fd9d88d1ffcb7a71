"""The Mosaic-GPU (Hopper) flash-attention kernels of mosaic_gpu.py.

* Validation: what the kernels refuse, with the ValueError the op falls back on.
* Lowering (default run): ``jax.export`` for CUDA from this CPU machine runs the whole Pallas ->
  Mosaic-GPU lowering (TMA descriptors, wgmma operand layouts, barriers, warp-specialised
  register budgets, shared-memory sizing); each case lowers the forward and the backward.
  PTX generation and the kernel launch still need a GPU.
* Interpret mode (slow): jax's Mosaic-GPU interpreter runs the kernels' warpgroups, TMA copies
  and barriers on CPU (matmuls as dot_general there), against the naive reference: outputs,
  lse and all gradients, with awkward lengths, GQA, fully masked rows and padded keys.
* ``gpu``: the compiled kernels against the reference on a Hopper (sm90) GPU (skipped elsewhere).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._common import dispatch, masks
from pallas_kernels._common.testing import assert_close
from pallas_kernels.flash_attention import masking, mosaic_gpu, reference

MOSAIC_GPU_CALL = re.compile(r"custom_call @(mosaic_gpu\w*)\(")
_DISABLED = [jax.export.DisabledSafetyCheck.custom_call(name)
             for name in ("mosaic_gpu", "mosaic_gpu_v2")]


def _kwargs(mask, tq, tk, blocks, interpret, scale, soft_cap=None):
  return dict(scale=scale, mask=mask, logits_soft_cap=soft_cap,
              q_offset=masking.causal_offset(tq, tk), kv_len=tk, block_q=blocks[0],
              block_k=blocks[1], interpret=interpret)


def _run_kernels(q, k, v, d_out, d_lse, *, mask, blocks, interpret, soft_cap):
  """flash_forward + flash_backward; returns out, lse [B, Tq, H], dq, dk, dv."""
  tq, tk = q.shape[1], k.shape[1]
  scale = q.shape[-1] ** -0.5
  out, lse = mosaic_gpu.flash_forward(
      q, k, v, None, None, **_kwargs(mask, tq, tk, blocks[:2], interpret, scale, soft_cap))
  grads = mosaic_gpu.flash_backward(
      q, k, v, None, None, out, lse, d_out, d_lse=jnp.transpose(d_lse, (0, 2, 1)),
      **_kwargs(mask, tq, tk, blocks[2:], interpret, scale, soft_cap))
  return (out, jnp.transpose(lse, (0, 2, 1)), *grads)


@functools.partial(jax.jit, static_argnames=("mask", "soft_cap"))
def _run_reference(q, k, v, d_out, d_lse, *, mask, soft_cap):
  fn = lambda q, k, v: reference.flash_attention_reference(
      q, k, v, mask=mask, logits_soft_cap=soft_cap, return_lse=True)
  (out, lse), vjp = jax.vjp(fn, q, k, v)
  return (out, lse, *vjp((d_out, d_lse)))


def _inputs(seed, b, tq, tk, h, hkv, d, dtype):
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  return (normal(keys[0], (b, tq, h, d)), normal(keys[1], (b, tk, hkv, d)),
          normal(keys[2], (b, tk, hkv, d)), normal(keys[3], (b, tq, h, d)),
          jax.random.normal(keys[4], (b, tq, h), jnp.float32))


def _check_against_reference(shape, dtype, mask, blocks, interpret, soft_cap=None, seed=0):
  b, tq, tk, h, hkv, d = shape
  q, k, v, d_out, d_lse = _inputs(seed, b, tq, tk, h, hkv, d, dtype)
  got = _run_kernels(q, k, v, d_out, d_lse, mask=mask, blocks=blocks, interpret=interpret,
                     soft_cap=soft_cap)
  want = _run_reference(q, k, v, d_out, d_lse, mask=mask, soft_cap=soft_cap)
  # The reference's output is rounded to the input dtype; its lse, grads are float32 math.
  for name, g, w in zip(("attention_output", "lse", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape, (name, g.shape, w.shape)
    assert_close(name, dtype, g, w)


# ----------------------------------------------------------------------------- validation


def test_padded_head_dim():
  assert [mosaic_gpu.padded_head_dim(d) for d in (1, 64, 65, 80, 128)] == [64, 64, 128, 128,
                                                                           128]
  with pytest.raises(ValueError, match="head_dim must be at most 128"):
    mosaic_gpu.padded_head_dim(256)


def test_unsupported_reason():
  assert mosaic_gpu.unsupported_reason(mask=masks.CausalMask(), dtype=jnp.bfloat16,
                                       head_dim=128) is None
  assert mosaic_gpu.unsupported_reason(mask=masks.FullMask(), dtype=jnp.float16) is None
  assert "segment" in mosaic_gpu.unsupported_reason(mask=masks.FullMask(), has_segments=True)
  assert mosaic_gpu.unsupported_reason(mask=masks.FullMask(), logits_soft_cap=30.0) is None
  assert "LocalMask" in mosaic_gpu.unsupported_reason(mask=masks.LocalMask(8, 0))
  assert "float32" in mosaic_gpu.unsupported_reason(mask=masks.FullMask(), dtype=jnp.float32)
  assert "head_dim" in mosaic_gpu.unsupported_reason(mask=masks.FullMask(), head_dim=256)


@pytest.mark.parametrize("kind, hopper", [
    ("NVIDIA H100 80GB HBM3", True), ("NVIDIA H200", True), ("NVIDIA GH200 480GB", True),
    ("NVIDIA A100-SXM4-80GB", False), ("NVIDIA B200", False), ("Tesla V100", False)])
def test_supported_devices_are_hopper(kind, hopper):
  device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform="gpu")
  assert mosaic_gpu.is_supported_device(device) == hopper
  if jax.default_backend() != "gpu":
    assert not mosaic_gpu.is_supported_device()


@pytest.mark.parametrize("change, message", [
    (dict(dtype=jnp.float32), "only bfloat16 and float16"),
    (dict(d=256), "head_dim must be at most 128"),
    (dict(mask=masks.CausalMask() & masks.LocalMask(16, 0)), "only full and causal"),
    (dict(segments=True), "segment ids"),
    (dict(block_q=96), "multiple of 64"),
])
def test_refusals_raise_value_error(change, message):
  dtype, d = change.get("dtype", jnp.bfloat16), change.get("d", 64)
  q = jax.ShapeDtypeStruct((1, 128, 2, d), dtype)
  seg = jax.ShapeDtypeStruct((1, 128), jnp.int32) if change.get("segments") else None
  kw = _kwargs(change.get("mask", masks.CausalMask()), 128, 128,
               (change.get("block_q", 64), 64), False, 0.125)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda q: mosaic_gpu.flash_forward(q, q, q, seg, seg, **kw), q)


def test_too_much_shared_memory_is_refused():
  q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
  kw = _kwargs(masks.FullMask(), 1024, 1024, (256, 512), False, 0.1)
  with pytest.raises(ValueError, match="shared memory"):
    jax.eval_shape(lambda q: mosaic_gpu.flash_forward(q, q, q, None, None, **kw), q)


def test_cost_counts_visited_blocks():
  common = dict(batch=2, q_len=1000, kv_len=1000, num_heads=4, num_kv_heads=2, head_dim=80,
                dtype=jnp.bfloat16, block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64)
  full = mosaic_gpu.cost(mask=masks.FullMask(), backward=False, **common)
  # 16 query blocks x 8 key blocks, all visited, head dim padded to 128.
  assert full.flops == 2 * 4 * 16 * 8 * 4 * 64 * 128 * 128
  causal = mosaic_gpu.cost(mask=masks.CausalMask(), backward=False, **common)
  assert 0.5 * full.flops < causal.flops < 0.6 * full.flops
  assert causal.hbm_bytes < full.hbm_bytes
  parts = dict(causal.parts)
  assert parts["fwd.pad"] > 0  # 1000 rows and head dim 80 are padded copies
  both = mosaic_gpu.cost(mask=masks.CausalMask(), **common)
  assert both.flops > 3 * causal.flops and {"dkdv.q+do+stats", "dq.kv"} <= dict(both.parts).keys()


# ----------------------------------------------------------------------------- lowering

LOWERING_CASES = {
    # (b, tq, tk, h, hkv, d), dtype, mask, blocks (fwd q, fwd k, bwd q, bwd k), soft cap
    "gqa_causal_awkward_len": ((1, 1000, 1000, 4, 2, 128), jnp.bfloat16, masks.CausalMask(),
                               (64, 128, 64, 64), None),
    "mqa_full_cross_f16_d64_soft_cap": ((2, 256, 700, 4, 1, 64), jnp.float16,
                                        masks.FullMask(), (64, 64, 64, 128), 30.0),
    "shifted_causal_q_longer_d80": ((1, 300, 200, 2, 2, 80), jnp.bfloat16, masks.CausalMask(-3),
                                    (128, 64, 64, 64), None),
}


def _export(fn, args):
  with dispatch.target_platform("gpu"):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=_DISABLED)(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_forward_and_backward_lower_for_cuda(case):
  (b, tq, tk, h, hkv, d), dtype, mask, blocks, soft_cap = LOWERING_CASES[case]
  q = jax.ShapeDtypeStruct((b, tq, h, d), dtype)
  kv = jax.ShapeDtypeStruct((b, tk, hkv, d), dtype)
  stats = jax.ShapeDtypeStruct((b, h, tq), jnp.float32)
  fwd_kw = _kwargs(mask, tq, tk, blocks[:2], False, d ** -0.5, soft_cap)
  bwd_kw = _kwargs(mask, tq, tk, blocks[2:], False, d ** -0.5, soft_cap)

  forward = _export(lambda q, k, v: mosaic_gpu.flash_forward(q, k, v, None, None, **fwd_kw),
                    (q, kv, kv))
  assert MOSAIC_GPU_CALL.findall(forward) and len(MOSAIC_GPU_CALL.findall(forward)) == 1
  assert "triton" not in forward

  def backward(q, k, v, out, lse, d_out, d_lse):
    return mosaic_gpu.flash_backward(q, k, v, None, None, out, lse, d_out, d_lse=d_lse,
                                     **bwd_kw)

  backward = _export(backward, (q, kv, kv, q, stats, q, stats))
  assert len(MOSAIC_GPU_CALL.findall(backward)) == 2  # the dK/dV and dQ kernels


# ----------------------------------------------------------------------------- interpret

INTERPRET_CASES = {
    # Causal, q longer than kv (the first 92 queries see nothing: out 0, lse -inf), GQA 2,
    # 100 keys padded to 128 (masked by kv_len), 3 query blocks (the last CTA's second
    # warpgroup has no block), and the two warpgroups of a CTA visit different key ranges.
    "causal_gqa_q_longer": ((1, 192, 100, 2, 1, 64), jnp.bfloat16, masks.CausalMask(),
                            (64, 64, 64, 64), None),
    # Full mask, float16, head_dim 80 padded to 128, q shorter than kv, MQA, soft cap.
    "full_f16_d80_cross_soft_cap": ((1, 70, 200, 2, 1, 80), jnp.float16, masks.FullMask(),
                                    (64, 128, 64, 64), 5.0),
    # Shifted causal (keys at distance >= 40), equal lengths, MHA, two batches.
    "far_causal_mha": ((2, 130, 130, 1, 1, 64), jnp.bfloat16, masks.CausalMask(40),
                       (64, 64, 64, 64), None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INTERPRET_CASES))
def test_interpret_matches_reference(case):
  shape, dtype, mask, blocks, soft_cap = INTERPRET_CASES[case]
  _check_against_reference(shape, dtype, mask, blocks, interpret=True, soft_cap=soft_cap)


# ----------------------------------------------------------------------------- hardware

GPU_CASES = {
    "causal_gqa_1000_d128": ((2, 1000, 1000, 8, 2, 128), jnp.bfloat16, masks.CausalMask(),
                             (64, 128, 64, 64)),
    "causal_decode_chunk_d64": ((1, 63, 2048, 4, 1, 64), jnp.bfloat16, masks.CausalMask(),
                                (64, 128, 64, 64)),
    "full_cross_f16_d80": ((1, 500, 1024, 4, 4, 80), jnp.float16, masks.FullMask(),
                           (64, 128, 64, 128)),
    "causal_soft_cap_gqa": ((1, 777, 777, 8, 2, 128), jnp.bfloat16, masks.CausalMask(),
                            (64, 128, 64, 64), 30.0),
    "causal_q_longer_empty_rows": ((1, 512, 300, 4, 2, 128), jnp.bfloat16, masks.CausalMask(),
                                   (64, 64, 64, 64)),
    "causal_4096_d128": ((1, 4096, 4096, 8, 8, 128), jnp.bfloat16, masks.CausalMask(),
                         (64, 128, 64, 64)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_compiled_matches_reference_on_hopper(case):
  if not mosaic_gpu.is_supported_device():
    pytest.skip(f"needs a Hopper (sm90) GPU, got {jax.devices()[0].device_kind}")
  shape, dtype, mask, blocks, *soft_cap = GPU_CASES[case]
  _check_against_reference(shape, dtype, mask, blocks, interpret=False,
                           soft_cap=soft_cap[0] if soft_cap else None)
