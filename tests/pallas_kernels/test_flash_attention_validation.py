"""Bad inputs to flash_attention raise ValueErrors that name the argument and the shape."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from pallas_kernels import flash_attention

Q = jnp.ones((1, 16, 4, 8), jnp.float32)
KV = jnp.ones((1, 16, 2, 8), jnp.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(query=Q[0]), r"query must have rank 4 \[batch, q_len, num_heads, head_dim\], got shape \(16, 4, 8\)"),
    (dict(key=KV[..., :4]), r"key must be .* head_dim=8 .* got \(1, 16, 2, 4\)"),
    (dict(key=jnp.ones((2, 16, 2, 8))), r"key must be .*batch=1"),
    (dict(value=KV[:, :8]), r"value must have shape \(1, 16, 2, 8\)"),
    (dict(key=jnp.ones((1, 16, 3, 8)), value=jnp.ones((1, 16, 3, 8))), r"num_heads \(4.*multiple of num_kv_heads \(3"),
    (dict(query=Q.astype(jnp.int32)), r"query must be a floating dtype .* got int32"),
    (dict(key=KV.astype(jnp.bfloat16)), r"query, key, value must share one dtype"),
    (dict(segment_ids=jnp.zeros((1, 15), jnp.int32)), r"q_segment_ids must have shape \(1, 16\)"),
    (dict(segment_ids=jnp.zeros((1, 16), jnp.float32)), r"q_segment_ids must be an integer array"),
    (dict(segment_ids=(jnp.zeros((1, 16), jnp.int32),)), r"pair"),
    (dict(query=jnp.ones((1, 8, 4, 8)), segment_ids=jnp.zeros((1, 16), jnp.int32)), r"single segment_ids array needs q_len == kv_len"),
    (dict(scale=-1.0), r"scale must be a positive finite number"),
    (dict(logits_soft_cap=0.0), r"logits_soft_cap must be a positive finite number"),
    (dict(implementation="cuda"), r"implementation must be one of"),
    (dict(implementation="pallas"), r"implementation='pallas' needs a TPU or GPU"),
    (dict(implementation="interpret", block_q=100), r"block_q must be a multiple of 128"),
    (dict(implementation="xla", block_k=0), r"block_k must be a positive int"),
])
def test_bad_inputs(kwargs, match):
  args = dict(query=Q, key=KV, value=KV)
  args.update(kwargs)
  if kwargs.get("implementation") == "pallas":
    import jax
    if jax.default_backend() != "cpu":
      pytest.skip("pallas is available on this platform")
  with pytest.raises(ValueError, match=match):
    flash_attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


def test_backend_specs_and_short_input_blocks():
  """Each backend states its facts in one spec; short inputs shrink the forward and backward
  blocks so that one divides the other (300 queries on TPU: 384 rows, not lcm(384, 256))."""
  from pallas_kernels import masks
  from pallas_kernels.flash_attention import ops
  from pallas_kernels.flash_attention.backends import backend_spec
  assert [backend_spec(n).layout for n in ("xla", "tpu", "gpu")] == ["bhtd", "bhtd", "bthd"]
  assert backend_spec("gpu").padded_head_dim(80) == 80  # No head_dim padding in HBM on GPU.
  causal = masks.make_mask(is_causal=True)
  blocks = dict.fromkeys(ops.BLOCK_NAMES)
  sizes = ops.block_sizes(backend_spec("tpu"), 300, 300, blocks, causal)
  assert (sizes["block_q"], sizes["block_q_bwd"]) == (384, 128)
  assert ops.padded_length(300, sizes["block_q"], sizes["block_q_bwd"]) == 384
  sizes = ops.block_sizes(backend_spec("tpu"), 5000, 5000, blocks, causal)
  assert (sizes["block_q"], sizes["block_q_bwd"]) == (512, 256)
  # Explicit sizes for long inputs are kept as given.
  sizes = ops.block_sizes(backend_spec("tpu"), 5000, 5000, dict(blocks, block_q=384), causal)
  assert (sizes["block_q"], sizes["block_q_bwd"]) == (384, 256)


def test_xla_skips_query_blocks_of_padding():
  """The XLA path visits no key block for query blocks past q_len (both directions)."""
  import numpy as np
  from pallas_kernels import masks
  from pallas_kernels.flash_attention import xla
  geometry = dict(mask=masks.make_mask(), q_offset=0, kv_len=300, block_q=64, block_k=128,
                  nq=6, nk=3, real_q_blocks=5)
  rows = np.asarray(xla._visits(rows_are_queries=True, **geometry))
  assert (rows[:5, :, 1] > rows[:5, :, 0]).all() and (rows[5:] == 0).all()
  cols = np.asarray(xla._visits(rows_are_queries=False, **geometry))
  assert cols[..., :2].max() == 5 and (cols[:, 0, 1] == 5).all()
