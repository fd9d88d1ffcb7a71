"""The roofline cost model of the shared scalar-decay kernels (``pallas_kernels/ssd/cost.py``)
counts what the block plan moves: unpadded small dims, states every ``interval`` chunks,
dB/dC once per head block."""

from __future__ import annotations

import pytest

from pallas_kernels.ssd import tpu
from pallas_kernels.ssd.cost import lightning_cost, ssd_cost

MAMBA2 = dict(batch=8, seq_len=8192, num_heads=24, head_dim=64, num_groups=1, d_state=64,
              dtype="bfloat16")


def _parts(cost):
  return dict(cost.parts)


def test_parts_add_up_and_backward_costs_more():
  for backend in ("tpu", "gpu"):
    fwd = ssd_cost(**MAMBA2, backend=backend)
    both = ssd_cost(**MAMBA2, backend=backend, backward=True)
    assert sum(v for _, v in both.parts) == both.hbm_bytes
    assert both.hbm_bytes > fwd.hbm_bytes and both.flops > fwd.flops > 0


def test_tpu_bytes_follow_the_block_plan():
  base = _parts(ssd_cost(**MAMBA2, backward=True))
  plan = tpu.make_plan(heads=24, groups=1, seq=8192, head_dim=64, d_state=64, itemsize=2,
                       chunk_size=128, precision="bf16x2")
  b, t, h, p, n = 8, 8192, 24, 64, 64
  # x read and y written once, unpadded head_dim, in bfloat16.
  assert base["fwd.x"] == 2 * b * h * t * p * 2
  # One float32 state per interval of chunks (written by the forward).
  states = b * h * (t // (128 * plan.interval)) * p * n * 4
  assert base["fwd.states"] == states + 2 * b * h * p * n * 4
  # B and C read once per head block, not once per head.
  assert base["fwd.bc"] == 2 * b * t * n * 2 * (h // plan.heads_per_block)
  wide = _parts(ssd_cost(**dict(MAMBA2, head_dim=128), backward=True))
  assert wide["fwd.x"] == 2 * base["fwd.x"]
  # Saving a state every chunk costs more bytes than every few chunks.
  every = _parts(ssd_cost(**MAMBA2, backward=True, interval=1, heads_per_block=8))
  assert every["fwd.states"] > base["fwd.states"]


def test_tpu_moves_fewer_bytes_than_the_gpu_plan_and_bf16x2_fewer_passes():
  tpu_cost = ssd_cost(**MAMBA2, backward=True)
  gpu_cost = ssd_cost(**MAMBA2, backward=True, backend="gpu")
  assert tpu_cost.hbm_bytes < gpu_cost.hbm_bytes
  highest = ssd_cost(**MAMBA2, backward=True, precision="highest")
  assert highest.flops > 2 * tpu_cost.flops


def test_lightning_is_ssd_with_one_group_per_head():
  got = lightning_cost(batch=1, seq_len=4096, num_heads=8, d_k=64, d_v=32, dtype="bfloat16",
                       backward=True)
  want = ssd_cost(batch=1, seq_len=4096, num_heads=8, head_dim=32, num_groups=8, d_state=64,
                  dtype="bfloat16", backward=True)
  assert got == want


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=0), "num_heads must be a positive int"),
    (dict(num_groups=5), r"num_heads \(24\) must be a multiple of num_groups \(5\)"),
    (dict(backend="cpu"), "backend must be one of"),
])
def test_validation(change, message):
  with pytest.raises(ValueError, match=message):
    ssd_cost(**dict(MAMBA2, **change))
