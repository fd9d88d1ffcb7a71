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
                                 ["--window-check", "--window-check-len", "0"],
                                 ["--report", "--window-check"], ["--memory-check", "--report"],
                                 ["--report-from", "x.json", "--window-check"]])
def test_benchmark_rejects_bad_arguments(bad):
  with pytest.raises(SystemExit):
    benchmark_kernels.main(bad)


# ---------------------------------------------------------------------------------------------
# The per-platform report (--report): markdown tables, plot, platform slug, coverage.

def _report_rows():
  """Synthetic rows of two kernels, ratios added: every figure below is known exactly."""
  def make(kernel, impl, role, time_ms, tflops, memory_mib, status="ok", note="", size=1024,
           config="c1", mode="fwd"):
    return benchmark_kernels.Row(
        kernel=kernel, config=config, size=size, mode=mode, dtype="float32",
        implementation=impl, role=role, status=status, time_ms=time_ms, tflops=tflops,
        memory_mib=memory_mib, note=note)

  rows = [
      make("flash_attention", "ours x", "ours", 2.0, 0.5, 10.0),
      make("flash_attention", "naive", "reference", 8.0, 0.125, 40.0),
      make("flash_attention", "peer a", "peer", 4.0, 0.25, 30.0),
      make("flash_attention", "peer b", "peer", None, None, 20.0, status="skipped",
           note="not run: over | budget"),
      make("flash_attention", "ours x", "ours", 0.0123, 1234.5, 2.0, size=256),
      make("ssd", "ours y", "ours", 3.0, 0.001, 1.5, config="c1", mode="fwd_bwd"),
      make("ssd", "ours y", "ours", 6.0, 0.002, 3.0, config="c2", mode="fwd_bwd", size=2048),
      make("ssd", "ours y", "ours", 1.0, None, 0.75, config="c1", size=512),
  ]
  benchmark_kernels.add_ratios(rows)
  return rows


_REPORT_METADATA = dict(
    platform="gpu", device_kind="NVIDIA H100 80GB HBM3", device_count=1, host_cpu_count=2,
    host_memory_available_gib=3.5, jax_version="9.9.9", jaxlib_version="9.9.8",
    python_version="3.11.0", command="python -m experiments.benchmark_kernels --report",
    date="2026-01-02T03:04:05+00:00", settings=dict(warmup=1, repeats=3, budget_bytes=2 ** 31),
    provenance=dict(git_commit="abc123", git_dirty=False))


def _table_lines(report, kernel):
  section = report.split(f"## {kernel}\n", 1)[1].split("\n## ", 1)[0]
  return [line for line in section.splitlines() if line.startswith("|")]


def test_report_tables_without_a_known_peak():
  report = benchmark_kernels.format_report(_report_rows(), _REPORT_METADATA, peak_flops=None,
                                           plot_name="x_time_memory.png")
  assert report.startswith("# Kernel benchmark: NVIDIA H100 80GB HBM3 (gpu)\n")
  assert "- Command: `python -m experiments.benchmark_kernels --report`" in report
  assert "jax 9.9.9, jaxlib 9.9.8" in report and "- Commit: abc123\n" in report
  assert "- Date: 2026-01-02T03:04:05+00:00" in report
  assert "median of 3 calls after 1 warm-up" in report and "budget 2.0 GiB" in report
  assert "![time and memory against length](x_time_memory.png)" in report
  assert "float32 rows are compared with the bf16 peak" in report
  lines = _table_lines(report, "flash_attention")
  assert lines[0] == (
      "| T | mode | dtype | implementation | role | status | time (ms) | TFLOP/s | % of peak | "
      "memory (MiB) | speedup vs ref | speedup vs best peer | memory vs ref | "
      "memory vs best peer | note |")
  assert lines[1] == "|---:|" + "---|" * 5 + "---:|" * 8 + "---|"  # Numbers align right.
  # Sorted by size: the 256 row (no reference or peer at 256: ratios "-") comes first.
  assert lines[2] == ("| 256 | fwd | float32 | ours x | ours | ok | 0.0123 | 1,234 | - | 2.0 | "
                      "- | - | - | - | - |")
  # Ours: reference 8 ms / 2 ms = 4x, best peer 4 ms / 2 = 2x; memory 40 / 10, 20 / 10.
  assert lines[3] == ("| 1,024 | fwd | float32 | ours x | ours | ok | 2.00 | 0.5 | - | 10.0 | "
                      "4.00x | 2.00x | 4.00x | 2.00x | - |")
  assert lines[4] == ("| 1,024 | fwd | float32 | naive | reference | ok | 8.00 | 0.125 | - | "
                      "40.0 | 1.00x | 0.50x | 1.00x | 0.50x | - |")
  assert lines[6] == ("| 1,024 | fwd | float32 | peer b | peer | skipped | - | - | - | 20.0 | "
                      "- | - | 2.00x | 1.00x | not run: over \\| budget |")
  assert len(lines) == 6 + 1
  # ssd holds two configs: a config column first, rows ordered by config then size.
  ssd = _table_lines(report, "ssd")
  assert ssd[0].startswith("| config | T | mode |") and len(ssd) == 5
  assert [line.split(" | ")[0:2] for line in ssd[2:]] == [
      ["| c1", "512"], ["| c1", "1,024"], ["| c2", "2,048"]]
  assert ssd[2].split(" | ")[7:10] == ["1.00", "-", "-"]  # No FLOPs: TFLOP/s and % are "-".
  assert "Config: c1." in report.split("## ssd", 1)[0]  # One config: named above the table.
  coverage = report.split("## Coverage", 1)[1]
  assert "- `flash_attention`: above." in coverage and "- `ssd`: above." in coverage
  assert "- `titans_memory`: not run in this invocation" in coverage
  assert "- `ring_attention`: not in this report:" in coverage
  assert "experiments.benchmark_context_parallel" in coverage


def test_report_percent_of_the_peak():
  rows = _report_rows()
  peak = 2e12  # 2 TFLOP/s: ours 0.5 TFLOP/s is 25%; the reference's 0.125 is 6.25%.
  assert benchmark_kernels.percent_of_peak(rows[0], peak) == 25.0
  assert benchmark_kernels.percent_of_peak(rows[0], None) is None
  assert benchmark_kernels.percent_of_peak(rows[3], peak) is None  # Skipped: no TFLOP/s.
  report = benchmark_kernels.format_report(rows, _REPORT_METADATA, peak_flops=peak)
  assert "dense bfloat16 peak, 2 TFLOP/s" in report and "![" not in report
  lines = _table_lines(report, "flash_attention")
  percent = [line.split(" | ")[8] for line in lines[2:]]
  # 1234.5 / 2 -> 61725%; 0.5 / 2; 0.125 / 2 (6.25 rounds half to even); 0.25 / 2; skipped.
  assert percent == ["61725.0%", "25.0%", "6.2%", "12.5%", "-"]
  ssd = [line.split(" | ")[9] for line in _table_lines(report, "ssd")[2:]]
  assert ssd == ["-", "0.05%", "0.1%"]  # None, 0.001 / 2 and 0.002 / 2 TFLOP/s.
  with pytest.raises(ValueError, match="peak_flops must be a positive"):
    benchmark_kernels.format_report(rows, _REPORT_METADATA, peak_flops=0.0)


def test_report_platform_slug_and_peak():
  slug = benchmark_kernels.platform_slug
  assert slug("cpu", "cpu") == "cpu" and slug("cpu", "Intel Xeon") == "cpu"
  assert slug("gpu", "NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
  assert slug("tpu", "TPU v5 lite") == "tpu_v5_lite"
  assert slug("tpu", "  TPU v6e (Trillium) ") == "tpu_v6e_trillium"
  with pytest.raises(ValueError, match="device_kind '--'"):
    slug("gpu", "--")
  peak = benchmark_kernels.report_peak_flops
  assert peak(dict(platform="cpu", device_kind="cpu")) is None
  assert peak(dict(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")) == 989e12
  assert peak(dict(platform="tpu", device_kind="TPU v5 lite")) == 197e12
  assert peak(dict(platform="gpu", device_kind="Some New GPU")) is None


def test_report_plot_series_and_png(tmp_path):
  rows = _report_rows()
  series = benchmark_kernels.plot_series(rows)
  assert list(series) == ["flash_attention", "ssd"]
  ours = series["flash_attention"][("ours x", "fwd", "c1")]
  assert ours == {"time": [(256, 0.0123), (1024, 2.0)], "memory": [(256, 2.0), (1024, 10.0)]}
  skipped = series["flash_attention"][("peer b", "fwd", "c1")]
  assert skipped == {"time": [], "memory": [(1024, 20.0)]}  # Memory only: it was not run.
  assert set(series["ssd"]) == {("ours y", "fwd_bwd", "c1"), ("ours y", "fwd_bwd", "c2"),
                                ("ours y", "fwd", "c1")}
  path = tmp_path / "p.png"
  benchmark_kernels.plot_report(rows, str(path), title="t")
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  assert (width, height) == (1300, 720)  # 13 x 3.6 inches per kernel row at 100 dpi.
  with pytest.raises(ValueError, match="rows is empty"):
    benchmark_kernels.plot_report([], str(tmp_path / "q.png"))


def test_report_covers_every_kernel(monkeypatch):
  import pkgutil

  import pallas_kernels
  kernels = {m.name for m in pkgutil.iter_modules(pallas_kernels.__path__)
             if m.ispkg and not m.name.startswith("_")}
  coverage = benchmark_kernels.kernel_coverage()
  assert set(coverage) == kernels and "ring_attention" in kernels
  assert {k for k, v in coverage.items() if v == "benchmark_kernels"} == set(
      benchmark_kernels.KERNEL_BENCHMARKS)
  monkeypatch.setattr(benchmark_kernels, "MEASURED_ELSEWHERE", {})
  with pytest.raises(ValueError, match=r"kernels \['ring_attention'\] with no entry"):
    benchmark_kernels.kernel_coverage()


def test_report_end_to_end(tmp_path):
  code = benchmark_kernels.main(["--quick", "--kernels", "flash_attention", "--sizes", "64",
                                 "--modes", "fwd", "--repeats", "1", "--report",
                                 str(tmp_path)])
  assert code == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "cpu.json", "cpu.md", "cpu_time_memory.png"]
  result = json.loads((tmp_path / "cpu.json").read_text())
  assert result["metadata"]["peak_bf16_flops_per_device"] is None
  report = (tmp_path / "cpu.md").read_text()
  assert f"`{result['metadata']['command']}`" in report and "--report" in report
  lines = _table_lines(report, "flash_attention")
  assert len(lines) == 2 + len(result["rows"])
  for row in result["rows"]:
    line = next(line for line in lines if f"| {row['implementation']} |" in line)
    cells = line.split(" | ")
    assert cells[6] == benchmark_kernels._fmt_ms(row["time_ms"]), (cells, row)
    assert cells[8] == "-"  # CPU: never a % of peak.
    assert cells[9] == f"{row['memory_mib']:,.1f}"
  # --report-from rebuilds the same report from the JSON, measuring nothing.
  again = tmp_path / "again"
  assert benchmark_kernels.main(["--report-from", str(tmp_path / "cpu.json"), "--report",
                                 str(again)]) == 0
  assert (again / "cpu.md").read_text() == report
  assert (again / "cpu_time_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(dict(metadata={}, rows=[dict(kernel="k")])))
  with pytest.raises(ValueError, match=r"row 0 of .*bad.json has fields \['kernel'\]"):
    benchmark_kernels.main(["--report-from", str(bad)])
