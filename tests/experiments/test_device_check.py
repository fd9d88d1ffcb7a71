"""``make device-check``: its CPU dry run end to end, its pieces, and the roofline cost models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from experiments import benchmark_kernels, device_check
from pallas_kernels._common.roofline import CHIPS, Cost
from pallas_kernels.decode_attention.cost import decode_cost
from pallas_kernels.selective_scan.cost import scan_cost, scan_plan
from pallas_kernels.titans_memory.cost import titans_cost, titans_plan

REPO_ROOT = device_check.REPO_ROOT


def test_dry_run_writes_the_report_with_roofline_and_says_what_it_skipped(tmp_path,
                                                                          monkeypatch):
  out = tmp_path / "out"
  monkeypatch.setenv("OUT", str(out))
  # A test file without the gpu marker: the test step must run and say "0 selected".
  code = device_check.main([
      "--dry-run", "--out-dir", str(tmp_path), "--kernels", "decode_attention",
      "--test-files", "tests/pallas_kernels/test_decode_attention_benchmark.py",
      "--repeats", "1", "--no-plot"])
  assert code == 0
  names = {p.name for p in tmp_path.iterdir()}
  assert {"cpu.md", "cpu.json", "cpu_device_check.json", "cpu_device_check.log"} <= names
  assert {"cpu.md", "cpu.json", "cpu_device_check.json", "cpu_device_check.log"} <= {
      p.name for p in out.iterdir()}  # Copied to $OUT.

  rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
  ours = [r for r in rows if r["role"] == "ours"]
  assert ours and all(r["status"] == "ok" for r in rows)
  for row in ours:  # Cache 64 x 2 kv heads x D64 float32, TPU block = the cache (one block).
    tpu, gpu = row["roofline"]["plans"]["tpu"], row["roofline"]["plans"]["gpu"]
    assert tpu["parts"]["kv"] == gpu["parts"]["kv"] == 2 * 64 * 2 * 64 * 4
    assert tpu["flops"] == 4 * 2 * 8 * 64 * 64  # 4 query heads per kv head -> 8 rows.
    bound = row["roofline"]["bound_us"]
    assert bound["v5e"] == pytest.approx(tpu["hbm_bytes"] / CHIPS["v5e"].hbm_bytes_per_s * 1e6)
    assert bound["h100"] == pytest.approx(gpu["hbm_bytes"] / CHIPS["h100"].hbm_bytes_per_s *
                                          1e6)
    assert set(row["roofline"]["bound_by"].values()) == {"memory"}
  assert all(r["roofline"] is None for r in rows if r["role"] != "ours")

  report = (tmp_path / "cpu.md").read_text()
  assert "| v5e µs | v6e µs | H100 µs | bound v5e/v6e/H100 |" in report
  assert "*Pallas* block plan" in report and "## Device check" in report
  summary = json.loads((tmp_path / "cpu_device_check.json").read_text())
  assert summary["tests"]["status"] == "none selected"
  assert summary["tests"]["summary"].startswith("0 gpu tests selected")
  assert summary["environment"]["installed"] is None and summary["dry_run"]
  assert summary["benchmark"]["returncode"] == 0
  peers = summary["peers"]
  assert {p["name"] for p in peers} == {name for name, _, _, _ in device_check.PEERS}
  for peer in peers:  # CPU: every peer is skipped, each with its reason.
    assert not peer["available"] and peer["reason"].startswith("skipped: needs a "), peer
    assert f"| {peer['name']} |" in report
  log = (tmp_path / "cpu_device_check.log").read_text()
  assert "[tests] none selected" in log and "[bench] exit 0" in log


def test_marked_files_and_slug():
  files = device_check.marked_test_files("gpu")
  assert files and all(f.startswith(os.path.join("tests", "pallas_kernels", "test_"))
                       for f in files)
  for path in files:
    with open(os.path.join(REPO_ROOT, path)) as f:
      assert "mark.gpu" in f.read()
  for platform, kind in (("cpu", "x"), ("gpu", "NVIDIA H200"), ("tpu", "TPU v5 lite")):
    assert device_check.platform_slug(platform, kind) == benchmark_kernels.platform_slug(
        platform, kind)


def test_parallel_test_workers_only_on_a_gpu_host_with_xdist_and_cores(monkeypatch):
  monkeypatch.setattr(os, "cpu_count", lambda: 16)
  assert device_check.parallel_test_workers("gpu", {"xdist": True}, dry_run=False) == 4
  assert device_check.parallel_test_workers("gpu", {"xdist": False}, dry_run=False) == 0
  assert device_check.parallel_test_workers("tpu", {"xdist": True}, dry_run=False) == 0
  assert device_check.parallel_test_workers("gpu", {"xdist": True}, dry_run=True) == 0
  monkeypatch.setattr(os, "cpu_count", lambda: 4)
  assert device_check.parallel_test_workers("gpu", {"xdist": True}, dry_run=False) == 0


def test_failures_are_reported_before_a_run_is_stopped(tmp_path):
  """The device check's tests run with LCLM_FAILURES_AT_ONCE=1: a failure's traceback is
  printed when it happens, so a run killed at its time limit still shows it."""
  (tmp_path / "test_two.py").write_text(textwrap.dedent("""
      import time
      def test_fails():
        assert 1 + 1 == 3, "arithmetic broke"
      def test_hangs():
        time.sleep(600)
  """))
  env = dict(os.environ, PYTHONPATH=os.path.join(REPO_ROOT, "tests"))
  proc = subprocess.Popen(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "failures_at_once",
       str(tmp_path / "test_two.py")], cwd=tmp_path, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  watchdog = threading.Timer(120, proc.kill)  # if the traceback never comes
  watchdog.start()
  lines = []
  for line in proc.stdout:  # Stop the run (still in test_hangs) once the traceback is out.
    lines.append(line)
    if "AssertionError: arithmetic broke" in line:
      break
  proc.kill()
  proc.communicate()
  watchdog.cancel()
  out = "".join(lines)
  assert "[failed at once] test_two.py::test_fails (call)" in out, out
  assert "AssertionError: arithmetic broke" in out, out
  assert "test_hangs" not in out.split("arithmetic broke")[0], out
  # tests/conftest.py loads the plugin when the variable is set.
  out = subprocess.run(
      [sys.executable, "-m", "pytest", "--co", "-q", "--trace-config", "-p", "no:cacheprovider",
       os.path.join("tests", "pallas_kernels", "test_ssd_cost.py")], cwd=REPO_ROOT,
      env=dict(os.environ, LCLM_FAILURES_AT_ONCE="1", JAX_PLATFORMS="cpu"), text=True,
      capture_output=True, timeout=300, check=False).stdout
  assert "module 'failures_at_once'" in out, out[-2000:]


def test_entry_points_import_without_the_training_stack():
  """A lent GPU machine has jax, flax, pytest but no gin, grain, orbax, tfds: the check and
  the benchmark must import there (blocked here by a meta-path finder)."""
  code = textwrap.dedent("""
      import importlib, sys
      BLOCKED = {"gin", "grain", "orbax", "tensorflow", "tensorflow_datasets", "matplotlib",
                 "transformers", "torch", "optax"}
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
      sys.meta_path.insert(0, Block())
      for module in ("experiments.device_check", "experiments.benchmark_kernels",
                     "experiments.bench_ssd", "experiments.bench_selective_scan",
                     "experiments.bench_lightning_attention", "experiments.bench_decode_attention",
                     "experiments.bench_titans_memory"):
        importlib.import_module(module)
      from experiments import benchmark_kernels
      assert benchmark_kernels.kernel_coverage()
      print("imported")
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, text=True,
                        capture_output=True, timeout=120, check=False)
  assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]


def test_time_budget_skips_the_rest_and_still_writes(tmp_path):
  out = tmp_path / "b.json"
  # A budget this small runs out at the first program of each kernel at the latest.
  code = benchmark_kernels.main(["--quick", "--sizes", "64", "--modes", "fwd", "--kernels",
                                 "decode_attention", "--time-budget", "1e-9", "--out",
                                 str(out)])
  assert code == 0
  rows = json.loads(out.read_text())["rows"]
  assert rows and all(r["status"] == "skipped" and r["note"].startswith(
      "not run: the run's time budget is spent") and r["time_ms"] is None for r in rows)
  assert not benchmark_kernels.benchmarking.out_of_time()  # The deadline ends with the run.


def test_roofline_reports_missing_and_unmodelled_backends():
  assert benchmark_kernels.roofline(None) is None
  with pytest.raises(ModuleNotFoundError):  # A missing model is an error, not a "-".
    benchmark_kernels.load_cost("no_such_kernel.cost", "cost")

  def tpu_only(backend):
    if backend == "gpu":
      raise NotImplementedError("GPU plan not modelled")
    return Cost(flops=197e12, hbm_bytes=819e9, parts=(("x", 819e9),))

  figures = benchmark_kernels.roofline(tpu_only)
  assert figures["bound_us"] == {"v5e": pytest.approx(1e6), "v6e": pytest.approx(
      max(197 / 918, 819 / 1640) * 1e6), "h100": None}
  assert figures["bound_by"] == {"v5e": "compute", "v6e": "memory", "h100": None}
  assert figures["plans"]["gpu"] is None and "GPU plan not modelled" in figures["note"]
  row = benchmark_kernels.Row(kernel="k", config="c", size=1, mode="fwd", dtype="bfloat16",
                              implementation="lclm (default=xla)", role="ours", status="ok")
  benchmark_kernels.attach_roofline([row], figures)
  table = benchmark_kernels.format_table([row])
  assert "compute/memory/-" in table and "1,000,000" in table


# ---------------------------------------------------------------------------------------------
# The cost models, each checked against a hand count.

def test_decode_cost_hand_count():
  # B2, cache 1000, 8 heads over 2 kv heads, D128 bf16, TPU block 512 (per-head blocks since
  # D % 128 == 0), 1 split: 2 blocks -> 1024 keys per (row, kv head).
  cost = decode_cost(batch=2, cache_len=1000, num_heads=8, num_kv_heads=2, head_dim=128,
                     dtype="bfloat16", backend="tpu")
  parts = dict(cost.parts)
  assert parts["kv"] == 2 * 2 * 2 * 1024 * 128 * 2
  q = 2 * 1 * 8 * 128 * 2
  q_tile = 2 * 2 * 8 * 128 * 2  # 4 query heads per kv head, padded to 8 rows on TPU.
  assert parts["q"] == 2 * q + q_tile and parts["out"] == 3 * q
  assert parts["partials"] == 2 * (2 * 2 * 1 * 8 * (128 + 1) * 4)
  assert cost.flops == 4 * 2 * 2 * 8 * 1024 * 128
  gpu = decode_cost(batch=2, cache_len=1000, num_heads=8, num_kv_heads=2, head_dim=128,
                    dtype="bfloat16", backend="gpu")
  assert dict(gpu.parts)["kv"] == 2 * 2 * 2 * 1000 * 128 * 2  # masked loads: exact length
  assert cost.bound_by("v5e") == "memory"
  with pytest.raises(ValueError, match="backend must be one of"):
    decode_cost(batch=1, cache_len=8, num_heads=1, num_kv_heads=1, head_dim=8,
                dtype="float32", backend="cpu")
  with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
    decode_cost(batch=1, cache_len=8, num_heads=3, num_kv_heads=2, head_dim=8,
                dtype="float32", backend="gpu")


def test_selective_scan_cost_hand_count():
  # B1, T256, d_inner 256, d_state 16, one group, bf16, z gate. TPU plan: chunk 128,
  # block_d 256 (= the channels), n_pad 16, n_lanes 128.
  plan = scan_plan(backend="tpu", d_inner=256, d_state=16)
  assert plan == dict(chunk=128, block_d=256, block_d_bwd=256, n_state=16, n_bc=128,
                      d_pad=256)
  cost = scan_cost(batch=1, seq_len=256, d_inner=256, d_state=16, dtype="bfloat16",
                   backend="tpu")
  parts = dict(cost.parts)
  row = 256 * 256 * 2
  assert parts["x"] == 4 * row  # u, delta, z read; y written
  bc_in, bc_copy = 2 * 256 * 16 * 2, 2 * 256 * 128 * 2
  assert parts["bc"] == bc_in + bc_copy + 1 * bc_copy  # one channel block reads the copy
  assert parts["states"] == 2 * 16 * 256 * 4  # 2 chunk-start states [16, 256] float32
  assert cost.flops == 7 * 256 * 256 * 16 + 6 * 256 * 256
  full = scan_cost(batch=1, seq_len=256, d_inner=256, d_state=16, dtype="bfloat16",
                   backend="tpu", backward=True)
  full_parts = dict(full.parts)
  assert full_parts["bwd.x"] == (4 + 3) * row
  assert full_parts["bwd.dbc"] == 2 * 2 * 256 * 128 * 4 + bc_in
  assert full.flops == cost.flops + 19 * 256 * 256 * 16 + 10 * 256 * 256
  # GPU plan: 16 channels per program, so B and C are read 256 / 16 = 16 times; one state per
  # 2048-token chunk, here one chunk (the sequence) per channel.
  gpu = dict(scan_cost(batch=1, seq_len=256, d_inner=256, d_state=16, dtype="bfloat16",
                       backend="gpu").parts)
  gpu_copy = 2 * 256 * 16 * 2
  assert gpu["bc"] == bc_in + gpu_copy + 16 * gpu_copy
  assert gpu["states"] == 1 * 16 * 256 * 4


def test_titans_cost_hand_count():
  # B1 H2 T512 d_k = d_v = 64 bf16, chunk 64: TPU one d_v tile, 8 chunks in one group (at
  # most 8 chunks of ~512 tokens), so one saved (M, S) pair per head.
  plan = titans_plan(backend="tpu", batch=1, heads=2, seq_len=512, d_k=64, d_v=64)
  assert plan == dict(dk=64, dv=64, block_v=64, tiles=1, saved=1)
  cost = titans_cost(batch=1, seq_len=512, heads=2, d_k=64, d_v=64, dtype="bfloat16",
                     backend="tpu")
  parts = dict(cost.parts)
  one = 2 * 512 * 64 * 2  # one of q, k, v: bh * T * d * 2 bytes
  gates = 3 * 2 * 512 * 4
  state = 2 * 64 * 64 * 4
  assert parts["layout"] == 2 * 3 * one + 2 * gates
  assert parts["qkv"] == 2 * one + gates + one
  assert parts["out"] == one + 2 * one
  assert parts["states"] == 2 * state * 1 + 2 * state
  assert cost.flops == 2 * 512 * (2 * 64 * 128 + 10 * 64 * 64)
  # GPU: a saved pair per chunk (8), d_v tiles of 32 (2 programs of 2 heads -> at most 16).
  gpu_plan = titans_plan(backend="gpu", batch=1, heads=2, seq_len=512, d_k=64, d_v=64)
  assert gpu_plan["saved"] == 8 and gpu_plan["tiles"] == 64 // gpu_plan["block_v"]
  gpu = dict(titans_cost(batch=1, seq_len=512, heads=2, d_k=64, d_v=64, dtype="bfloat16",
                         backend="gpu").parts)
  assert gpu["states"] == 2 * state * 8 + 2 * state
  full = titans_cost(batch=1, seq_len=512, heads=2, d_k=64, d_v=64, dtype="bfloat16",
                     backend="tpu", backward=True)
  assert full.flops == 3 * cost.flops and full.hbm_bytes > 2 * cost.hbm_bytes


# ---------------------------------------------------------------------------------------------
# The TPU compiler's memory figures (issue 18): formatting, and the real compile (slow).

def test_tpu_memory_section_and_report_from(tmp_path, monkeypatch):
  monkeypatch.delenv(benchmark_kernels.LIBTPU_ENV, raising=False)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  missing = benchmark_kernels.tpu_memory_figures()
  assert missing["topology"] == "v5e:2x2" and "no libtpu.so" in missing["error"]
  assert "Not measured: no libtpu.so" in benchmark_kernels.format_tpu_memory(missing)
  figures = dict(topology="v5e:2x2", programs=[
      dict(kernel="flash_attention", config="c", input_bytes=192 * 2 ** 20,
           temp_bytes=448 * 2 ** 20, argument_bytes=1, output_bytes=1,
           temp_over_inputs=448 / 192, compile_s=3.0),
      dict(kernel="ssd", config="d", input_bytes=214 * 2 ** 20, error="E: no | way",
           compile_s=0.1)])
  text = benchmark_kernels.format_tpu_memory(figures)
  assert "| flash_attention | c | 192 | 448 | 2.33x | 3.0 |" in text
  assert "| ssd | d | 214 | - | failed: E: no \\| way | 0.1 |" in text
  # --report-from keeps the figures of the JSON.
  path = tmp_path / "cpu.json"
  path.write_text(json.dumps(dict(
      metadata=dict(platform="cpu", device_kind="cpu", jax_version="x", jaxlib_version="y",
                    command="c", date="d"),
      rows=[dict(kernel="k", config="c", size=8, mode="fwd", dtype="float32",
                 implementation="i", role="ours", status="skipped", time_ms=None, tflops=None,
                 memory_mib=None, measured_peak_mib=None, speedup_vs_reference=None,
                 memory_vs_reference=None, speedup_vs_best_peer=None,
                 memory_vs_best_peer=None, note="")],  # An older file: no "roofline".
      tpu_memory=figures)))
  assert benchmark_kernels.main(["--report-from", str(path), "--no-plot"]) == 0
  assert not (tmp_path / "cpu_time_memory.png").exists()
  report = (tmp_path / "cpu.md").read_text()
  assert "## TPU compiler memory (compile-only)" in report and "2.33x" in report


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LCLM_LIBTPU_PATH"),
                    reason="set LCLM_LIBTPU_PATH to a libtpu.so")
def test_tpu_memory_figures_compile_for_v5e():
  figures = benchmark_kernels.tpu_memory_figures()
  assert "error" not in figures, figures
  by_kernel = {p["kernel"]: p for p in figures["programs"]}
  flash = by_kernel["flash_attention"]
  assert flash["input_bytes"] == 3 * 2 * 8192 * 16 * 128 * 2  # 192 MiB of q, k, v
  assert "error" not in flash and 0 < flash["temp_over_inputs"] < 2.34  # issue 18: 2.34x
  assert by_kernel["ssd"]["input_bytes"] == (8 * 8192 * 24 * 64 * 2 + 8 * 8192 * 24 * 4
                                             + 24 * 4 + 2 * 8 * 8192 * 64 * 2)


def test_flash_and_ssd_rows_use_their_cost_models():
  """The benchmark calls the models other modules own, at the blocks a default call runs
  with."""
  fwd, both = (benchmark_kernels.flash_roofline(
      batch=1, seq_len=256, heads=2, head_dim=64, dtype="bfloat16", causal=True,
      backward=backward) for backward in (False, True))
  assert fwd["plans"]["tpu"]["flops"] > 0 and fwd["bound_us"]["v5e"] > 0
  assert both["plans"]["tpu"]["hbm_bytes"] > fwd["plans"]["tpu"]["hbm_bytes"]
  from experiments import bench_lightning_attention, bench_ssd
  for figures in (bench_ssd.ssd_roofline(1, 256, 2, 64, 1, 64, "bfloat16", backward=True),
                  bench_lightning_attention.lightning_roofline(1, 256, 2, 64, "bfloat16",
                                                               backward=True)):
    assert any(figures["bound_us"].values())
