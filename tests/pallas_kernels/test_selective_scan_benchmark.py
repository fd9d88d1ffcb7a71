"""experiments/bench_selective_scan.py at a tiny size: a row per implementation and mode,
all measured, ratios filled in by the driver's ``add_ratios``."""

from __future__ import annotations

import math

import jax
import pytest

from experiments import benchmark_kernels
from experiments.bench_selective_scan import _candidates, bench_selective_scan, scan_flops


def test_scan_flops():
  assert scan_flops(1, 10, 4, 2, backward=False) == 7 * 80 + 6 * 40
  assert scan_flops(1, 10, 4, 2, backward=True) == 26 * 80 + 16 * 40


@pytest.mark.slow
def test_benchmark_rows(tmp_path):
  settings = benchmark_kernels.Settings(
      sizes=(64,), dtype=None, modes=benchmark_kernels.MODES, warmup=1, repeats=1,
      budget_bytes=8 * 2 ** 30, quick=True)
  rows = bench_selective_scan(settings)
  benchmark_kernels.add_ratios(rows)
  names = [c.name for c in _candidates(jax.default_backend(), 0.1)]
  assert len(rows) == len(names) * len(benchmark_kernels.MODES)
  for row in rows:
    assert row.status == "ok", row
    assert row.time_ms > 0 and row.tflops > 0 and row.memory_mib > 0, row
    assert math.isfinite(row.speedup_vs_reference) and math.isfinite(row.speedup_vs_best_peer)
  assert {r.implementation for r in rows} == set(names)
