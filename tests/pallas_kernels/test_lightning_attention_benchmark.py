"""The lightning-attention benchmark entry runs at a tiny size and reports every candidate."""

from __future__ import annotations

import jax

from experiments.bench_lightning_attention import (
  bench_lightning_attention,
  lightning_flops,
)
from experiments.benchmark_kernels import OURS, PEER, REFERENCE, Settings, add_ratios


def test_rows_for_every_candidate():
  settings = Settings(sizes=(64,), dtype=None, modes=("fwd",), warmup=1, repeats=1,
                      budget_bytes=2 ** 32, quick=True)
  rows = bench_lightning_attention(settings)
  add_ratios(rows)
  roles = {r.implementation: r.role for r in rows}
  assert REFERENCE in roles.values() and OURS in roles.values() and PEER in roles.values()
  for row in rows:
    assert row.kernel == "lightning_attention" and row.size == 64 and row.mode == "fwd"
    if jax.default_backend() == "cpu":
      assert row.status == "ok", row
      assert row.time_ms > 0 and row.tflops > 0 and row.memory_mib > 0, row
  assert lightning_flops(1, 2, 10, 4, 4, backward=True) == 3.5 * lightning_flops(
      1, 2, 10, 4, 4, backward=False) == 3.5 * 2 * 10 * (2 * 64 * 8 + 4 * 16)
