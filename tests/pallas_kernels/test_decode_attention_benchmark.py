"""The decode-attention benchmark entry runs at a tiny size and reports every candidate."""

from __future__ import annotations

import jax

from experiments.bench_decode_attention import (bench_decode_attention, decode_bytes,
                                                decode_flops, roofline_note)
from experiments.benchmark_kernels import OURS, PEER, REFERENCE, Settings, add_ratios


def test_rows_for_every_candidate():
  settings = Settings(sizes=(64,), dtype=None, modes=("fwd", "fwd_bwd"), warmup=1, repeats=1,
                      budget_bytes=2 ** 32, quick=True)
  rows = bench_decode_attention(settings)
  add_ratios(rows)
  roles = {r.implementation: r.role for r in rows}
  assert {OURS, REFERENCE, PEER} <= set(roles.values())
  for row in rows:
    assert row.kernel == "decode_attention" and row.size == 64 and row.mode == "fwd"
    if jax.default_backend() == "cpu":
      assert row.status == "ok", row
      assert row.time_ms > 0 and row.tflops > 0 and row.memory_mib > 0, row
      assert "GB/s" in row.note and "H100" in row.note, row
  assert bench_decode_attention(Settings(
      sizes=(64,), dtype=None, modes=("fwd_bwd",), warmup=1, repeats=1, budget_bytes=2 ** 32,
      quick=True)) == []


def test_traffic_and_flop_counts():
  assert decode_bytes(2, 1024, 8, 128, 2) == 2 * 2 * 1024 * 8 * 128 * 2
  assert decode_flops(2, 32, 1024, 128) == 4 * 2 * 32 * 1024 * 128
  note = roofline_note(819 * 10 ** 6, 1e-3)
  assert "819.0 GB/s" in note and "v5e 1,000.0us" in note
