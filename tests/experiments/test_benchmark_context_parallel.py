"""The context-parallel memory benchmark at a tiny size: P = 1 and 2 fake devices."""

from __future__ import annotations

import json

import pytest

from experiments import benchmark_context_parallel


@pytest.mark.slow  # 20-35 s on 2 cores (8 fake devices, compiles every strategy).
def test_memory_table_and_json(tmp_path, capsys):
  out = tmp_path / "cp.json"
  code = benchmark_context_parallel.main([
      "--seq-len", "2048", "--devices", "1,2", "--strategies", "ring,ulysses",
      "--load-balances", "none", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
      "--out", str(out)])
  assert code == 0
  result = json.loads(out.read_text())
  rows = {(r["strategy"], r["load_balance"], r["devices"]): r for r in result["rows"]}
  # The one-device flash reference, then each strategy on 1 and 2 devices.
  assert set(rows) == {("flash", "none", 1), ("ring", "none", 1), ("ring", "none", 2),
                       ("ulysses", "none", 1), ("ulysses", "none", 2)}
  ring1, ring2 = rows["ring", "none", 1], rows["ring", "none", 2]
  assert ring1["status"] == ring2["status"] == "ok" and ring1["ratio_to_p1"] == 1.0
  # Each device holds half of q, k, v and the cotangent (the arguments), and less in all.
  assert abs(ring2["argument_mib"] - ring1["argument_mib"] / 2) < 1e-6
  assert ring2["peak_mib"] < 0.9 * ring1["peak_mib"]
  # Ulysses with 2 kv heads over 2 devices: one head each, the whole program halves.
  assert 0.4 < rows["ulysses", "none", 2]["ratio_to_p1"] < 0.6
  assert "python -m experiments.benchmark_context_parallel" in result["metadata"]["command"]
  printed = capsys.readouterr().out
  assert "ratio to P=1" in printed and "T=2048" in printed


def test_rejected_configurations_are_rows_not_crashes(tmp_path):
  # Ulysses cannot split 2 kv heads over 4 devices: the row says why.
  rows = benchmark_context_parallel._run_worker(
      ["--seq-len", "256", "--devices", "4", "--strategies", "ulysses", "--load-balances",
       "none", "--heads", "4", "--kv-heads", "2", "--head-dim", "8"], 4)
  assert [r["status"] for r in rows] == ["rejected"]
  assert "num_kv_heads (2) must both be divisible" in rows[0]["note"]
