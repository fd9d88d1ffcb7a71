"""The kernel benchmark driver, the memory acceptance check and the kernel demo, at tiny sizes."""

from __future__ import annotations

import json
import math
import re

import jax
import pytest

from experiments import benchmark_kernels, benchmarking, kernel_demo


def _run_benchmark(tmp_path, *extra, kernels="flash_attention"):
  out = tmp_path / "bench.json"
  code = benchmark_kernels.main(["--quick", "--sizes", "128", "--out", str(out),
                                 "--kernels", kernels, *extra])
  assert code == 0
  return json.loads(out.read_text())


def test_benchmark_rows_for_every_implementation(tmp_path):
  result = _run_benchmark(tmp_path)
  rows = result["rows"]
  candidates = benchmark_kernels._attention_candidates(jax.default_backend(), 0.125, True)
  for mode in benchmark_kernels.MODES:
    for cand in candidates:
      matches = [r for r in rows if r["implementation"] == cand.name and r["mode"] == mode]
      assert len(matches) == 1, (cand.name, mode)
  for row in rows:
    if row["role"] in (benchmark_kernels.OURS, benchmark_kernels.REFERENCE) or (
        row["implementation"] == "jax.nn xla"):
      assert row["status"] == "ok", row
    if row["status"] != "ok":
      continue
    assert row["time_ms"] > 0 and row["tflops"] > 0 and row["memory_mib"] > 0, row
    for field in ("speedup_vs_reference", "memory_vs_reference", "speedup_vs_best_peer",
                  "memory_vs_best_peer"):
      assert math.isfinite(row[field]) and row[field] > 0, (field, row)
    if row["role"] == benchmark_kernels.REFERENCE:
      assert row["speedup_vs_reference"] == 1.0 and row["memory_vs_reference"] == 1.0
  metadata = result["metadata"]
  assert metadata["jax_version"] == jax.__version__
  assert "--quick" in metadata["command"] and metadata["date"]
  provenance = metadata["provenance"]  # benchmarking.describe_environment
  assert provenance["jax_version"] == jax.__version__ and provenance["git_commit"]
  assert provenance["device_count"] == jax.device_count() and "gin_config" not in provenance


def test_benchmark_skips_runs_over_the_memory_budget(tmp_path):
  rows = _run_benchmark(tmp_path, "--modes", "fwd", "--memory-budget-gib", "1e-6")["rows"]
  assert rows
  for row in rows:
    assert row["status"] == "skipped" and row["time_ms"] is None, row
    assert row["memory_mib"] > 0 and "budget" in row["note"], row


def test_every_kernel_is_registered_and_runs(tmp_path):
  """The recurrent cores' entries (defined in their own modules) run through the driver."""
  assert set(benchmark_kernels.KERNEL_BENCHMARKS) == {
      "flash_attention", "selective_scan", "ssd", "lightning_attention", "decode_attention",
      "titans_memory"}
  rows = _run_benchmark(tmp_path, "--modes", "fwd", kernels="ssd,lightning_attention")["rows"]
  for kernel in ("ssd", "lightning_attention"):
    mine = [r for r in rows if r["kernel"] == kernel]
    assert {r["role"] for r in mine} == {"ours", "reference", "peer"}, kernel
    assert all(r["status"] == "ok" and r["time_ms"] > 0 for r in mine
               if r["role"] in ("ours", "reference")), mine


def test_ratios_are_their_figure_over_ours():
  make = lambda impl, role, time_ms, memory_mib, status="ok": benchmark_kernels.Row(
      kernel="k", config="c", size=8, mode="fwd", dtype="float32", implementation=impl,
      role=role, status=status, time_ms=time_ms, memory_mib=memory_mib)
  ours = make("ours", "ours", 2.0, 10.0)
  ref = make("ref", "reference", 8.0, 40.0)
  fast_peer = make("fast", "peer", 4.0, 30.0)
  lean_peer = make("lean", "peer", None, 20.0, status="skipped")
  benchmark_kernels.add_ratios([ours, ref, fast_peer, lean_peer])
  assert (ours.speedup_vs_reference, ours.memory_vs_reference) == (4.0, 4.0)
  assert (ours.speedup_vs_best_peer, ours.memory_vs_best_peer) == (2.0, 2.0)
  assert (ref.speedup_vs_reference, ref.memory_vs_reference) == (1.0, 1.0)
  assert lean_peer.speedup_vs_reference is None and lean_peer.memory_vs_best_peer == 1.0
  table = benchmark_kernels.format_table([ours, ref, fast_peer, lean_peer]).splitlines()
  assert len(table) == 6 and "skipped" in table[-1]


def test_attention_flops_convention():
  forward = benchmarking.attention_flops(2, 3, 5, 7, 11, causal=False, backward=False)
  assert forward == 4 * 2 * 3 * 5 * 7 * 11
  assert benchmarking.attention_flops(2, 3, 5, 7, 11, causal=True, backward=True) == (
      forward / 2 * 3.5)


def test_memory_check_ours_under_a_quarter_of_the_reference():
  check = benchmark_kernels.memory_check(2048)
  assert 0 < check["ours_bytes"] < check["reference_bytes"]
  assert check["passed"] and check["ratio"] > 4


def test_window_check_at_a_tiny_size(tmp_path, capsys):
  out = tmp_path / "window.json"
  code = benchmark_kernels.main([
      "--window-check", "--window-check-len", "256", "--window-check-window", "16",
      "--warmup", "1", "--repeats", "1", "--out", str(out)])
  report = capsys.readouterr().out
  result = json.loads(out.read_text())
  check = result["window_check"]
  assert (check["seq_len"], check["window"], check["mode"]) == (256, 16, "fwd_bwd")
  assert check["dense_ms"] > 0 and check["window_ms"] > 0
  assert check["ratio"] == check["window_ms"] / check["dense_ms"]
  # Query i sees min(i, 16) + 1 keys: 17 * 256 - 136 pairs of 256 * 257 / 2.
  assert check["visible_area_ratio"] == (17 * 256 - 136) / (256 * 257 / 2)
  assert check["passed"] == (check["ratio"] <= check["max_ratio"])
  assert code == (0 if check["passed"] else 1)
  rows = {r["implementation"]: r for r in result["rows"]}
  assert set(rows) == {"dense causal", "window 16"}
  assert all(r["status"] == "ok" and r["size"] == 256 for r in rows.values())
  assert rows["window 16"]["speedup_vs_reference"] == rows["dense causal"]["time_ms"] / rows[
      "window 16"]["time_ms"]
  # The table, then the summary with the ratio and the verdict.
  assert re.search(r"flash_attention\s+fwd_bwd\s+256\s+float32\s+dense causal\s+ok", report)
  assert re.search(r"flash_attention\s+fwd_bwd\s+256\s+float32\s+window 16\s+ok", report)
  verdict = "PASS" if check["passed"] else "FAIL"
  assert re.search(rf"window / dense time: {check['ratio']:.3f} \(visible area 0\.\d{{3}}; "
                   rf"target <= {check['max_ratio']:.3f}\) -> {verdict}", report), report
  assert "--window-check" in result["metadata"]["command"]


def test_kernel_demo_passes(capsys):
  assert kernel_demo.main(["--seq-len", "256", "--repeats", "1"]) == 0
  report = capsys.readouterr().out
  assert "PASS" in report and "FAIL" not in report


def test_measure_interleaved_reports_each_program():
  import jax.numpy as jnp
  x = jnp.arange(64.0)
  fail = lambda x: x.reshape(7, -1)  # Does not trace: 64 is not a multiple of 7.
  big = lambda x: jnp.outer(x, x)
  results = benchmarking.measure_interleaved(
      [(jnp.sin, (x,)), (fail, (x,)), (big, (x,)), (jnp.cos, (x,))],
      budget_bytes=4 * 1024, warmup=1, repeats=2)
  assert [r.status for r in results] == ["ok", "failed", "skipped", "ok"]
  assert results[0].seconds > 0 and results[3].seconds > 0 and results[0].memory_bytes > 0
  assert "reshape" in results[1].note.lower() or "TypeError" in results[1].note
  assert results[2].seconds is None and "budget" in results[2].note


def test_causal_window_pairs():
  brute = lambda t, w: sum(min(i, w) + 1 for i in range(t))
  for t, w in ((1, 0), (5, 0), (5, 2), (5, 10), (100, 7)):
    assert benchmarking.causal_window_pairs(t, w) == brute(t, w), (t, w)
  assert benchmarking.window_attention_flops(2, 3, 5, 7, 2, backward=False) == (
      4 * 2 * 3 * 7 * brute(5, 2))


@pytest.mark.parametrize("bad", [["--modes", "bwd"], ["--kernels", "nope"],
                                 ["--window-check", "--memory-check"],
                                 ["--window-check", "--window-check-len", "0"]])
def test_benchmark_rejects_bad_arguments(bad):
  with pytest.raises(SystemExit):
    benchmark_kernels.main(bad)
