"""decode_attention lowers for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does;
a primitive or layout the lowering rejects fails here. Each case exports the public op
(forward only: decoding is inference) at a realistic size, traced for the target platform.
With a libtpu wheel at hand (``LCLM_LIBTPU_PATH``), the TPU kernel is also compiled by
Mosaic for v4, v5e and v6e (``libtpu_compile.py``: layouts and VMEM, no TPU needed), for
both of its cache layouts (per-kv-head blocks when head_dim % 128 == 0 or a single kv head,
all-kv-head blocks otherwise); Triton -> PTX still needs a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from libtpu_compile import TOPOLOGIES, compile_programs, requires_libtpu
from pallas_kernels import decode_attention

# (batch, q_len, num_heads, cache_len, num_kv_heads, head_dim), keyword arguments.
CASES = {
    "gqa_8k_d128": dict(shape=(4, 1, 32, 8192, 8, 128)),
    "gqa_8k_d128_speculative_window_sinks_cap": dict(
        shape=(4, 4, 32, 8192, 8, 128), kwargs=dict(local_window_size=(1024, 0),
                                                     num_sink_tokens=4, logits_soft_cap=30.0)),
    "gqa_d80_awkward_length": dict(shape=(2, 3, 8, 1000, 2, 80)),
    "mqa_d64_window": dict(shape=(2, 1, 8, 4096, 1, 64), kwargs=dict(local_window_size=256)),
}


def _program(case, dtype):
  b, tq, h, t, hk, d = case["shape"]
  args = [jax.ShapeDtypeStruct((b, tq, h, d), dtype),
          jax.ShapeDtypeStruct((b, t, hk, d), dtype),
          jax.ShapeDtypeStruct((b, t, hk, d), dtype),
          jax.ShapeDtypeStruct((b,), jnp.int32)]

  def decode(q, k, v, lengths):
    return decode_attention(q, k, v, lengths, return_lse=True, implementation="pallas",
                            **case.get("kwargs", {}))

  return decode, args


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_lowers(platform, case):
  fn, args = _program(CASES[case], jnp.bfloat16)
  mlir = export_mlir(fn, args, platform)
  assert mlir.count(CUSTOM_CALL[platform]) == 1


@pytest.mark.parametrize("platform", ["tpu", "cuda"], ids=["to_tpu", "to_cuda"])
def test_float32_lowers(platform):
  fn, args = _program(CASES["gqa_d80_awkward_length"], jnp.float32)
  assert export_mlir(fn, args, platform).count(CUSTOM_CALL[platform]) == 1


# Mosaic compiles (libtpu_compile.py): both cache layouts, bf16 and f32, up to 64K keys.
COMPILE_CASES = {
    "gqa_64k_d128": dict(shape=(8, 1, 32, 65536, 8, 128)),
    "gqa_8k_d128_speculative_window_sinks_cap": CASES[
        "gqa_8k_d128_speculative_window_sinks_cap"],
    "gqa_d80_awkward_length": CASES["gqa_d80_awkward_length"],
    "mha_d64_32_kv_heads": dict(shape=(2, 1, 32, 4096, 32, 64)),
}


def tpu_programs(case):
  """For libtpu_compile: the forward of ``case`` in bfloat16 and float32."""
  return [(dtype.__name__, *_program(COMPILE_CASES[case], dtype))
          for dtype in (jnp.bfloat16, jnp.float32)]


@pytest.mark.slow  # about 2.5 minutes on 2 cores
@requires_libtpu
def test_tpu_kernel_compiles_with_mosaic():
  compiled = compile_programs("test_decode_attention_lowering", COMPILE_CASES)
  assert len(compiled) == len(TOPOLOGIES) * len(COMPILE_CASES) * 2, compiled
