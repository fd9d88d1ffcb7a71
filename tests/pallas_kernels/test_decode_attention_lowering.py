"""decode_attention lowers for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does;
a primitive or layout the lowering rejects fails here. Each case exports the public op
(forward only: decoding is inference) at a realistic size, traced for the target platform.
With a libtpu wheel at hand (``LCLM_LIBTPU_PATH``), the TPU kernel is also compiled by
Mosaic for v4, v5e and v6e (``libtpu_compile.py``: layouts and VMEM, no TPU needed), for
both of its cache layouts (blocks of every kv head, or one kv head's blocks for MQA), with
block retrieval at a realistic size, and its compiled memory plan holds no copy of the
caches; Triton -> PTX still needs a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from libtpu_compile import TOPOLOGIES, compile_programs, memory_analyses, requires_libtpu
from pallas_kernels import decode_attention

# (batch, q_len, num_heads, cache_len, num_kv_heads, head_dim), keyword arguments.
CASES = {
    "gqa_8k_d128": dict(shape=(4, 1, 32, 8192, 8, 128)),
    "gqa_8k_d128_speculative_window_sinks_cap": dict(
        shape=(4, 4, 32, 8192, 8, 128), kwargs=dict(local_window_size=(1024, 0),
                                                     num_sink_tokens=4, logits_soft_cap=30.0)),
    "gqa_d80_awkward_length": dict(shape=(2, 3, 8, 1000, 2, 80)),
    "mqa_d64_window": dict(shape=(2, 1, 8, 4096, 1, 64), kwargs=dict(local_window_size=256)),
    # Block retrieval (``block_indices``): 16 selected blocks per kv head (block_k 128 tiles
    # on both platforms) with a window and sinks; one list per query head; all-kv-head TPU
    # blocks (head_dim 64) serving the union of the kv heads' lists.
    "retrieval_gqa_8k_d128_window_sinks": dict(
        shape=(4, 1, 32, 8192, 8, 128), selected=(8, 16),
        kwargs=dict(block_k=128, local_window_size=(1024, 0), num_sink_tokens=4)),
    "retrieval_per_query_head_speculative": dict(
        shape=(2, 3, 8, 4096, 2, 128), selected=(8, 4), kwargs=dict(block_k=128)),
    "retrieval_gqa_d64_all_kv_head_blocks": dict(
        shape=(2, 1, 16, 4096, 4, 64), selected=(4, 8),
        kwargs=dict(block_k=128, local_window_size=512, num_sink_tokens=4)),
    # A 512-token prefill chunk through block retrieval: query blocks of 32 (TPU: a
    # program holds the 8 kv heads' 4 query heads) or 16 (GPU) queries, one kernel in a
    # lax.map.
    "retrieval_prefill_chunk_512": dict(
        shape=(1, 512, 32, 16384, 8, 128), selected=(8, 16),
        kwargs=dict(block_k=128, local_window_size=(1024, 0), num_sink_tokens=4)),
}


def _program(case, dtype):
  """(fn, args); with ``selected`` = (lists, max_selected), fn also takes block_indices
  int32 [batch, lists, max_selected]."""
  b, tq, h, t, hk, d = case["shape"]
  args = [jax.ShapeDtypeStruct((b, tq, h, d), dtype),
          jax.ShapeDtypeStruct((b, t, hk, d), dtype),
          jax.ShapeDtypeStruct((b, t, hk, d), dtype),
          jax.ShapeDtypeStruct((b,), jnp.int32)]
  if "selected" in case:
    args.append(jax.ShapeDtypeStruct((b, *case["selected"]), jnp.int32))

  def decode(q, k, v, lengths, block_indices=None):
    return decode_attention(q, k, v, lengths, return_lse=True, implementation="pallas",
                            block_indices=block_indices, **case.get("kwargs", {}))

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
    # Block retrieval at a realistic size: 128K cache, TPU block 512, top-32 blocks per kv
    # head plus a 4K window and sinks, GQA 32/8, head_dim 128.
    "retrieval_128k_top32_d128": dict(
        shape=(4, 1, 32, 131072, 8, 128), selected=(8, 32),
        kwargs=dict(block_k=512, local_window_size=(4096, 0), num_sink_tokens=4)),
    "retrieval_gqa_d64_all_kv_head_blocks": CASES["retrieval_gqa_d64_all_kv_head_blocks"],
    "mqa_d64_window": CASES["mqa_d64_window"],
    "retrieval_prefill_chunk_512": CASES["retrieval_prefill_chunk_512"],
}


def tpu_programs(case):
  """For libtpu_compile: the forward of ``case`` in bfloat16 and float32."""
  return [(dtype.__name__, *_program(COMPILE_CASES[case], dtype))
          for dtype in (jnp.bfloat16, jnp.float32)]


@pytest.mark.slow  # about 5 minutes of CPU (8 cases x 3 topologies x 2 dtypes)
@requires_libtpu
def test_tpu_kernel_compiles_with_mosaic():
  compiled = compile_programs("test_decode_attention_lowering", COMPILE_CASES)
  assert len(compiled) == len(TOPOLOGIES) * len(COMPILE_CASES) * 2, compiled


@pytest.mark.slow  # about 90 s on 2 cores
@requires_libtpu
def test_tpu_memory_plan_copies_no_cache():
  """The kernel reads the caches in place: no temporary near their size (viewing a GQA
  cache as [batch, cache_len, kv_heads * head_dim] made XLA copy both caches every call)."""
  cases = ("gqa_64k_d128", "retrieval_128k_top32_d128", "retrieval_prefill_chunk_512")
  plans = memory_analyses("test_decode_attention_lowering", cases)
  assert len(plans) == 2 * len(cases), plans
  for key, plan in plans.items():
    assert plan["temp"] < plan["argument"] // 100, (key, plan)
