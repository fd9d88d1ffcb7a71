"""One command that benchmarks every kernel against its reference and its peers (GUIDE §5).

    python -m experiments.benchmark_kernels [--kernels flash_attention] [--sizes 1024,4096]
        [--dtype bfloat16] [--modes fwd,fwd_bwd] [--out benchmarks/results/x.json] [--quick]
        [--report [DIR]]
    python -m experiments.benchmark_kernels --report-from benchmarks/results/cpu.json
    python -m experiments.benchmark_kernels --memory-check [--memory-check-len 16384]
    python -m experiments.benchmark_kernels --window-check [--window-check-len 8192]
        [--window-check-window 256]

Each kernel is an entry of ``KERNEL_BENCHMARKS`` (name -> function of :class:`Settings`
returning :class:`Row` s); adding a kernel adds an entry and leaves the driver alone. For each
size x mode x implementation a row holds the median time, achieved TFLOP/s and compiled peak
memory; the driver then adds the ratios to the reference and to the best peer of the same
size and mode (their time / ours and their bytes / ours: > 1 means this row is better).

A program whose compiled memory exceeds the budget is not run: its row says "skipped" and
still reports the memory. The table is printed and written, with the device, the jax
version, the command and the date, as JSON.

``--report [DIR]`` (DIR default ``benchmarks/results``; an explicit flag, so a plain run still
writes only its JSON) also writes the record of a platform: ``DIR/<platform>.md`` and
``DIR/<platform>_time_memory.png``, with the JSON at ``DIR/<platform>.json`` unless ``--out``
says otherwise; ``<platform>`` is "cpu" or the slugified device kind
(:func:`platform_slug`: ``nvidia_h100_80gb_hbm3``, ``tpu_v5_lite``). The markdown has a header
(device, jax/jaxlib versions, the exact command, date, git commit), one table per kernel
(size, mode, dtype, implementation, role, time, TFLOP/s, % of the device's dense bf16 peak
from ``lclm.training.flops.peak_flops_per_device`` -- float32 rows are compared with that
bf16 peak; "-" on CPU and on devices of unknown peak --, compiled memory, the four ratios)
and a coverage footer; the PNG has one row per kernel: time and memory against length,
log-log, a line per implementation and mode. Every kernel subpackage of ``pallas_kernels``
is either an entry of ``KERNEL_BENCHMARKS`` or listed in ``MEASURED_ELSEWHERE`` with the
script that measures it (:func:`kernel_coverage`): ring attention / context parallelism
needs several devices and is measured by ``experiments.benchmark_context_parallel``.
``--report-from JSON`` measures nothing and rebuilds the markdown and the plot from the JSON
of an earlier run (its command, date and commit stay in the header).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from experiments import benchmarking
from pallas_kernels import flash_attention

OURS, REFERENCE, PEER = "ours", "reference", "peer"
MODES = ("fwd", "fwd_bwd")
RESULTS_DIR = os.path.join("benchmarks", "results")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the command line asks of every kernel benchmark.

  sizes: sequence lengths, or None for the kernel's per-platform default.
  dtype: input dtype name, or None for the kernel's per-platform default.
  modes: subset of ``MODES``: "fwd" (forward only), "fwd_bwd" (forward, then all gradients).
  budget_bytes: a program whose compiled memory exceeds this is not run.
  """
  sizes: tuple[int, ...] | None
  dtype: str | None
  modes: tuple[str, ...]
  warmup: int
  repeats: int
  budget_bytes: int
  quick: bool


@dataclasses.dataclass
class Row:
  """One (kernel, size, mode, implementation) measurement; None where not measured.

  role: "ours", "reference" or "peer". The four ratio fields are filled in by
  :func:`add_ratios`: speedup_* = their time / this time, memory_* = their bytes / these.
  """
  kernel: str
  config: str
  size: int
  mode: str
  dtype: str
  implementation: str
  role: str
  status: str
  time_ms: float | None = None
  tflops: float | None = None
  memory_mib: float | None = None
  measured_peak_mib: float | None = None
  speedup_vs_reference: float | None = None
  memory_vs_reference: float | None = None
  speedup_vs_best_peer: float | None = None
  memory_vs_best_peer: float | None = None
  note: str = ""


def row_from_measurement(measurement: benchmarking.Measurement, *, flops: float, **fields):
  """A Row from a :class:`benchmarking.Measurement`, with achieved TFLOP/s from ``flops``."""
  seconds = measurement.seconds
  mib = lambda b: None if b is None else b / benchmarking.MIB
  return Row(status=measurement.status, note=measurement.note,
             time_ms=None if seconds is None else seconds * 1e3,
             tflops=None if not seconds else flops / seconds / 1e12,
             memory_mib=mib(measurement.memory_bytes),
             measured_peak_mib=mib(measurement.measured_peak_bytes), **fields)


# ---------------------------------------------------------------------------------------------
# Flash attention.


@dataclasses.dataclass(frozen=True)
class _AttentionCandidate:
  """An attention implementation: ``forward(q, k, v)`` in its own ``layout``.

  layout: "bthd" ([batch, len, heads, head_dim], ours) or "bhtd". ``error`` set means the
  candidate could not be built here (e.g. not importable); its rows say why.
  """
  name: str
  role: str
  forward: Callable | None
  layout: str = "bthd"
  error: str = ""


def _attention_defaults(platform: str, quick: bool) -> dict:
  if platform == "cpu":
    sizes = (1024,) if quick else (1024, 4096)
    return dict(sizes=sizes, dtype="float32", batch=1, heads=8, head_dim=64, causal=True)
  sizes = (4096,) if quick else (4096, 8192, 16384, 32768)
  return dict(sizes=sizes, dtype="bfloat16", batch=1, heads=16, head_dim=128, causal=True)


def _attention_candidates(platform: str, scale: float, causal: bool):
  """Ours (default, plus the XLA path on accelerators), the reference and the peers."""
  ours = lambda impl: lambda q, k, v: flash_attention(
      q, k, v, scale=scale, is_causal=causal, implementation=impl)
  default = "xla" if platform == "cpu" else "pallas"
  candidates = [_AttentionCandidate(f"lclm (default={default})", OURS, ours(None))]
  if platform != "cpu":
    candidates.append(_AttentionCandidate("lclm xla", OURS, ours("xla")))
  candidates.append(_AttentionCandidate("reference", REFERENCE, ours("reference")))

  jax_nn = lambda impl: lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=causal, implementation=impl)
  candidates.append(_AttentionCandidate("jax.nn xla", PEER, jax_nn("xla")))
  if platform == "gpu":
    candidates.append(_AttentionCandidate("jax.nn cudnn", PEER, jax_nn("cudnn")))
    candidates.append(_pallas_peer(
        "pallas.ops.gpu mha", "jax.experimental.pallas.ops.gpu.attention", "bthd",
        lambda module: lambda q, k, v: module.mha(
            q, k, v, segment_ids=None, sm_scale=scale, causal=causal)))
  if platform == "tpu":
    candidates.append(_pallas_peer(
        "pallas.ops.tpu flash", "jax.experimental.pallas.ops.tpu.flash_attention", "bhtd",
        lambda module: lambda q, k, v: module.flash_attention(
            q, k, v, causal=causal, sm_scale=scale)))
  return candidates


def _pallas_peer(name, module_name, layout, make_forward):
  import importlib
  try:
    module = importlib.import_module(module_name)
  except Exception as error:  # Absent or broken in this jax build: report, do not fail.
    return _AttentionCandidate(name, PEER, None, layout, f"not importable: {error}")
  return _AttentionCandidate(name, PEER, make_forward(module), layout)


def _to_layout(arrays, layout):
  return arrays if layout == "bthd" else tuple(jnp.swapaxes(x, 1, 2) for x in arrays)


def bench_flash_attention(settings: Settings) -> list[Row]:
  """Self-attention with q_len == kv_len (so every peer's causal alignment agrees)."""
  platform = jax.default_backend()
  defaults = _attention_defaults(platform, settings.quick)
  sizes = settings.sizes or defaults["sizes"]
  dtype = settings.dtype or defaults["dtype"]
  b, h, d, causal = (defaults[k] for k in ("batch", "heads", "head_dim", "causal"))
  config = f"B{b} H{h} D{d}{' causal' if causal else ''}"
  candidates = _attention_candidates(platform, d ** -0.5, causal)
  rows = []
  for t in sizes:
    keys = jax.random.split(jax.random.key(t), 4)
    q, k, v, d_out = (jax.random.normal(key, (b, t, h, d), dtype) for key in keys)
    for mode in settings.modes:
      flops = benchmarking.attention_flops(
          b, h, t, t, d, causal=causal, backward=(mode == "fwd_bwd"))
      for cand in candidates:
        fields = dict(kernel="flash_attention", config=config, size=t, mode=mode, dtype=dtype,
                      implementation=cand.name, role=cand.role)
        if cand.forward is None:
          rows.append(Row(status="failed", note=cand.error, **fields))
          continue
        if mode == "fwd":
          fn, args = cand.forward, _to_layout((q, k, v), cand.layout)
        else:
          fn = benchmarking.forward_and_backward(cand.forward)
          args = _to_layout((q, k, v, d_out), cand.layout)
        measurement = benchmarking.measure(
            fn, *args, budget_bytes=settings.budget_bytes, warmup=settings.warmup,
            repeats=settings.repeats)
        rows.append(row_from_measurement(measurement, flops=flops, **fields))
        _progress(rows[-1])
  return rows


def memory_check(seq_len: int = 16384, *, batch: int = 1, heads: int = 8, head_dim: int = 64,
                 dtype=jnp.float32, causal: bool = True) -> dict:
  """Compiled peak memory of forward + backward: default implementation vs the reference.

  The project's acceptance criterion: ours takes under a quarter of the naive reference's
  memory at 16K tokens. Both programs are compiled for abstract inputs and never run.
  Returns the configuration, both byte counts, ratio = reference / ours, and ``passed``.
  """
  spec = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype)
  measured = {}
  for name, impl in (("ours", None), ("reference", "reference")):
    fn = benchmarking.forward_and_backward(lambda q, k, v, impl=impl: flash_attention(
        q, k, v, is_causal=causal, implementation=impl))
    measured[name] = benchmarking.compiled_memory_bytes(fn, spec, spec, spec, spec)
  ours, reference = measured["ours"], measured["reference"]
  return dict(
      seq_len=seq_len, batch=batch, heads=heads, head_dim=head_dim,
      dtype=jnp.dtype(dtype).name, causal=causal, mode="fwd_bwd",
      ours_bytes=ours, reference_bytes=reference, ratio=reference / ours,
      passed=bool(ours * 4 < reference))


def format_memory_check(check: dict) -> str:
  mib = benchmarking.MIB
  return (
      f"Memory check (compiled peak, forward + backward, B{check['batch']} "
      f"T{check['seq_len']} H{check['heads']} D{check['head_dim']} {check['dtype']}"
      f"{' causal' if check['causal'] else ''}):\n"
      f"  ours (default implementation): {check['ours_bytes'] / mib:12,.1f} MiB\n"
      f"  naive reference:               {check['reference_bytes'] / mib:12,.1f} MiB\n"
      f"  reference / ours: {check['ratio']:.1f}x -> "
      f"{'PASS' if check['passed'] else 'FAIL'} (needs ours < 1/4 of the reference)")


# ---------------------------------------------------------------------------------------------
# Sliding window vs dense causal: block skipping must turn into time.

# Per platform: the size, the window and the target (window time / dense time at most
# ``max_ratio``). CPU runs the default (XLA) path at 8K; accelerators the Pallas kernels at 32K.
WINDOW_CHECK_CASES = {
    "cpu": dict(seq_len=8192, window=256, batch=1, heads=4, head_dim=64, dtype="float32",
                max_ratio=0.2),
    "accelerator": dict(seq_len=32768, window=1024, batch=1, heads=16, head_dim=128,
                        dtype="bfloat16", max_ratio=1 / 8),
}


def window_check(seq_len: int | None = None, window: int | None = None, *,
                 warmup: int = 2, repeats: int = 5,
                 budget_bytes: int | None = None) -> tuple[list[Row], dict]:
  """Forward + backward of the default implementation: causal sliding window vs dense causal.

  Both programs run in this process at the same size, their timed calls interleaved (causal
  self-attention; the window case passes ``local_window_size=window``, so each query sees
  itself and ``window`` keys before it). ``seq_len`` and ``window`` override the platform's
  case (``WINDOW_CHECK_CASES``). Returns the two rows (dense has the "reference" role, so
  the window row's ``x ref`` is its speedup) and a summary: times, ratio = window time /
  dense time, the ratio of the visible areas (what perfect skipping would give), the target
  and ``passed``.
  """
  platform = jax.default_backend()
  case = dict(WINDOW_CHECK_CASES["cpu" if platform == "cpu" else "accelerator"])
  if seq_len is not None:
    case["seq_len"] = seq_len
  if window is not None:
    case["window"] = window
  t, w = case["seq_len"], case["window"]
  b, h, d, dtype = case["batch"], case["heads"], case["head_dim"], case["dtype"]
  budget = benchmarking.memory_budget_bytes() if budget_bytes is None else budget_bytes
  keys = jax.random.split(jax.random.key(t), 4)
  q, k, v, d_out = (jax.random.normal(key, (b, t, h, d), dtype) for key in keys)
  config = f"B{b} H{h} D{d} causal"
  programs = (
      ("dense causal", REFERENCE, None,
       benchmarking.attention_flops(b, h, t, t, d, causal=True, backward=True)),
      (f"window {w}", OURS, w,
       benchmarking.window_attention_flops(b, h, t, d, w, backward=True)),
  )
  fns = [benchmarking.forward_and_backward(
      lambda q, k, v, lws=lws: flash_attention(q, k, v, is_causal=True, local_window_size=lws))
         for _, _, lws, _ in programs]
  # Interleaved timing: the two programs alternate, so load changes hit both alike.
  measurements = benchmarking.measure_interleaved(
      [(fn, (q, k, v, d_out)) for fn in fns], budget_bytes=budget, warmup=warmup,
      repeats=repeats)
  rows = []
  for (name, role, _, flops), measurement in zip(programs, measurements):
    rows.append(row_from_measurement(
        measurement, flops=flops, kernel="flash_attention", config=config, size=t,
        mode="fwd_bwd", dtype=dtype, implementation=name, role=role))
    _progress(rows[-1])
  add_ratios(rows)
  dense, windowed = rows
  ratio = (windowed.time_ms / dense.time_ms
           if dense.time_ms and windowed.time_ms else None)
  summary = dict(
      case, platform=platform, implementation="xla" if platform == "cpu" else "pallas",
      mode="fwd_bwd", dense_ms=dense.time_ms, window_ms=windowed.time_ms, ratio=ratio,
      visible_area_ratio=benchmarking.causal_window_pairs(t, w) / (t * (t + 1) / 2),
      passed=ratio is not None and ratio <= case["max_ratio"])
  return rows, summary


def format_window_check(check: dict) -> str:
  ms = lambda x: f"{'-':>15}" if x is None else f"{x:12,.2f} ms"
  ratio = "-" if check["ratio"] is None else f"{check['ratio']:.3f}"
  return (
      f"Window check (forward + backward, default implementation={check['implementation']}, "
      f"B{check['batch']} T{check['seq_len']} H{check['heads']} D{check['head_dim']} "
      f"{check['dtype']}, causal):\n"
      f"  {'dense causal:':<21}{ms(check['dense_ms'])}\n"
      f"  {'window ' + str(check['window']) + ':':<21}{ms(check['window_ms'])}\n"
      f"  window / dense time: {ratio} (visible area {check['visible_area_ratio']:.3f}; "
      f"target <= {check['max_ratio']:.3f}) -> {'PASS' if check['passed'] else 'FAIL'}")


# ---------------------------------------------------------------------------------------------
# The registry and the driver.

def _lazy(module: str, function: str) -> Callable[[Settings], list[Row]]:
  """A benchmark defined in ``experiments.<module>`` (which imports this module's Row)."""
  def bench(settings: Settings) -> list[Row]:
    import importlib
    return getattr(importlib.import_module(f"experiments.{module}"), function)(settings)
  bench.__name__ = function
  return bench


KERNEL_BENCHMARKS: dict[str, Callable[[Settings], list[Row]]] = {
    "flash_attention": bench_flash_attention,
    "selective_scan": _lazy("bench_selective_scan", "bench_selective_scan"),
    "ssd": _lazy("bench_ssd", "bench_ssd"),
    "lightning_attention": _lazy("bench_lightning_attention", "bench_lightning_attention"),
    "decode_attention": _lazy("bench_decode_attention", "bench_decode_attention"),
    "titans_memory": _lazy("bench_titans_memory", "bench_titans_memory"),
}


def add_ratios(rows: list[Row]) -> None:
  """Fills the ratio fields of every row from the reference and peers of its group.

  A group is one (kernel, config, size, mode, dtype). The best peer is the fastest (for
  time) and the leanest (for memory) peer of the group that has the figure; a skipped row
  still has its compiled memory, so it counts for memory.
  """
  groups: dict[tuple, list[Row]] = {}
  for row in rows:
    groups.setdefault((row.kernel, row.config, row.size, row.mode, row.dtype), []).append(row)
  for group in groups.values():
    ref = next((r for r in group if r.role == REFERENCE), None)
    peers = [r for r in group if r.role == PEER]
    best_time = min((r.time_ms for r in peers if r.time_ms), default=None)
    best_memory = min((r.memory_mib for r in peers if r.memory_mib), default=None)
    for row in group:
      row.speedup_vs_reference = _ratio(ref and ref.time_ms, row.time_ms)
      row.memory_vs_reference = _ratio(ref and ref.memory_mib, row.memory_mib)
      row.speedup_vs_best_peer = _ratio(best_time, row.time_ms)
      row.memory_vs_best_peer = _ratio(best_memory, row.memory_mib)


def _ratio(theirs, ours):
  return theirs / ours if theirs and ours else None


_COLUMNS = (  # header, Row field, format
    ("kernel", "kernel", "{}"), ("mode", "mode", "{}"), ("T", "size", "{}"),
    ("dtype", "dtype", "{}"), ("implementation", "implementation", "{}"),
    ("status", "status", "{}"), ("time ms", "time_ms", "{:.2f}"),
    ("TFLOP/s", "tflops", "{:.3f}"), ("mem MiB", "memory_mib", "{:,.1f}"),
    ("peak MiB", "measured_peak_mib", "{:,.1f}"),
    ("x ref", "speedup_vs_reference", "{:.2f}"), ("x peer", "speedup_vs_best_peer", "{:.2f}"),
    ("mem x ref", "memory_vs_reference", "{:.2f}"),
    ("mem x peer", "memory_vs_best_peer", "{:.2f}"), ("note", "note", "{}"),
)


def format_table(rows: list[Row]) -> str:
  """Rows as plain text with aligned columns; "-" where a figure is missing.

  Columns with no figure in any row (e.g. measured peak on CPU) are left out.
  """
  columns = [c for c in _COLUMNS if any(getattr(r, c[1]) not in (None, "") for r in rows)]
  cells = [[h for h, _, _ in columns]]
  for row in rows:
    cells.append(["-" if getattr(row, f) is None else fmt.format(getattr(row, f))
                  for _, f, fmt in columns])
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  numeric = [fmt != "{}" or field == "size" for _, field, fmt in columns]
  lines = []
  for n, line in enumerate(cells):
    lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                           for c, w, num in zip(line, widths, numeric)).rstrip())
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _progress(row: Row) -> None:
  time_text = "-" if row.time_ms is None else f"{row.time_ms:.2f} ms"
  print(f"  {row.kernel} T={row.size} {row.mode} {row.implementation}: {row.status} "
        f"{time_text} {row.note}".rstrip(), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The per-platform report: markdown tables and a plot of time and memory against length.

# Kernels of ``pallas_kernels`` that this driver does not run, and where they are measured.
MEASURED_ELSEWHERE: dict[str, str] = {
    "ring_attention": (
        "context-parallel attention (`ring_attention`, `context_parallel_attention`: ring, "
        "all-gather, Ulysses) needs a mesh of several devices; its per-device memory as the "
        "context axis grows is measured by `python -m experiments.benchmark_context_parallel "
        "--seq-len 65536` (fake CPU devices, compile only; "
        "`benchmarks/results/context_parallel_memory_cpu_*.json`), not by this driver"),
}


def kernel_coverage() -> dict[str, str]:
  """Every kernel subpackage of ``pallas_kernels`` -> where it is benchmarked.

  The value is "benchmark_kernels" for an entry of :data:`KERNEL_BENCHMARKS` and the text of
  :data:`MEASURED_ELSEWHERE` otherwise. Raises ValueError naming a kernel that is in neither,
  so a new kernel cannot silently miss the benchmark.
  """
  import pkgutil

  import pallas_kernels
  names = sorted(m.name for m in pkgutil.iter_modules(pallas_kernels.__path__)
                 if m.ispkg and not m.name.startswith("_"))
  missing = [n for n in names if n not in KERNEL_BENCHMARKS and n not in MEASURED_ELSEWHERE]
  if missing:
    raise ValueError(
        f"kernel_coverage: pallas_kernels has kernels {missing} with no entry in "
        f"KERNEL_BENCHMARKS ({sorted(KERNEL_BENCHMARKS)}) nor in MEASURED_ELSEWHERE "
        f"({sorted(MEASURED_ELSEWHERE)}); add a benchmark entry for each.")
  return {n: "benchmark_kernels" if n in KERNEL_BENCHMARKS else MEASURED_ELSEWHERE[n]
          for n in names}


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def platform_slug(platform: str, device_kind: str) -> str:
  """The report's file name stem: "cpu" on CPU, else the slugified device kind.

  E.g. ("gpu", "NVIDIA H100 80GB HBM3") -> "nvidia_h100_80gb_hbm3", ("tpu", "TPU v5 lite")
  -> "tpu_v5_lite": lower case, every run of other characters than [a-z0-9] becomes "_".
  """
  if platform == "cpu":
    return "cpu"
  slug = _slug(device_kind)
  if not slug:
    raise ValueError(f"platform_slug: device_kind {device_kind!r} (platform {platform!r}) "
                     "has no letter or digit to name the report with.")
  return slug


def report_peak_flops(environment: dict) -> float | None:
  """Peak dense bf16 FLOP/s of the benchmarked device (``lclm.training.flops``), None on
  CPU and on devices not in its table: the denominator of the report's "% of peak"."""
  if environment["platform"] == "cpu":
    return None
  from lclm.training import flops
  return flops.peak_flops_per_device(environment["device_kind"])


def percent_of_peak(row: Row, peak_flops: float | None) -> float | None:
  """100 x achieved FLOP/s / ``peak_flops`` (FLOP/s per device); None without either."""
  if peak_flops is None or row.tflops is None:
    return None
  return 100.0 * row.tflops * 1e12 / peak_flops


def _fmt_ms(x: float) -> str:
  return f"{x:,.2f}" if x >= 1 else f"{x:.3g}"


def _fmt_sig(x: float) -> str:
  return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def _fmt_ratio(x: float) -> str:
  return f"{x:.2f}x"


def _fmt_percent(x: float) -> str:
  return f"{x:.1f}%" if x >= 0.1 else f"{x:.2g}%"


_REPORT_COLUMNS = (  # header, value of (row, percent of peak), format
    ("T", lambda r, p: r.size, "{:,}".format),
    ("mode", lambda r, p: r.mode, str),
    ("dtype", lambda r, p: r.dtype, str),
    ("implementation", lambda r, p: r.implementation, str),
    ("role", lambda r, p: r.role, str),
    ("status", lambda r, p: r.status, str),
    ("time (ms)", lambda r, p: r.time_ms, _fmt_ms),
    ("TFLOP/s", lambda r, p: r.tflops, _fmt_sig),
    ("% of peak", lambda r, p: p, _fmt_percent),
    ("memory (MiB)", lambda r, p: r.memory_mib, "{:,.1f}".format),
    ("allocator peak (MiB)", lambda r, p: r.measured_peak_mib, "{:,.1f}".format),
    ("speedup vs ref", lambda r, p: r.speedup_vs_reference, _fmt_ratio),
    ("speedup vs best peer", lambda r, p: r.speedup_vs_best_peer, _fmt_ratio),
    ("memory vs ref", lambda r, p: r.memory_vs_reference, _fmt_ratio),
    ("memory vs best peer", lambda r, p: r.memory_vs_best_peer, _fmt_ratio),
    ("note", lambda r, p: r.note, str),
)


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def kernel_table(rows: list[Row], peak_flops: float | None = None) -> str:
  """A markdown table of one kernel's rows, ordered by (config, size, mode) then as measured.

  "-" marks a figure that is missing (not run, no reference or peer in the group, peak
  unknown). A "config" column comes first when the rows hold several configs; the allocator
  peak column appears only when some row has it (accelerators).
  """
  if peak_flops is not None and not peak_flops > 0:
    raise ValueError(f"kernel_table: peak_flops must be a positive FLOP/s figure or None, "
                     f"got {peak_flops!r}.")
  configs = list(dict.fromkeys(r.config for r in rows))
  order = {m: i for i, m in enumerate(MODES)}
  rows = sorted(rows, key=lambda r: (configs.index(r.config), r.size,
                                     order.get(r.mode, len(order))))
  columns = [c for c in _REPORT_COLUMNS if c[0] != "allocator peak (MiB)"
             or any(r.measured_peak_mib is not None for r in rows)]
  if len(configs) > 1:
    columns.insert(0, ("config", lambda r, p: r.config, str))
  lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
           "|" + "|".join("---" if fmt is str else "---:" for _, _, fmt in columns) + "|"]
  for row in rows:
    percent = percent_of_peak(row, peak_flops)
    cells = []
    for _, value, fmt in columns:
      v = value(row, percent)
      cells.append("-" if v is None or v == "" else _cell(fmt(v)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_report(rows: list[Row], metadata: dict, *, peak_flops: float | None = None,
                  memory_check: dict | None = None, plot_name: str | None = None) -> str:
  """The markdown report of one run: header, one table per kernel, the plot, notes, footer.

  Args:
    rows: the run's rows, ratios already added (:func:`add_ratios`).
    metadata: the run's metadata (``main``'s: :func:`benchmarking.describe_environment` plus
      "command", "date" and "settings").
    peak_flops: the device's dense bf16 peak FLOP/s for "% of peak" (None: "-" everywhere;
      always None on CPU).
    memory_check: :func:`memory_check`'s result when the run made one.
    plot_name: file name of the plot, linked below the header when given.
  """
  provenance = metadata.get("provenance", {})
  settings = metadata.get("settings", {})
  dirty = provenance.get("git_dirty", "unknown")
  out = [
      f"# Kernel benchmark: {metadata['device_kind']} ({metadata['platform']})", "",
      f"- Device: {metadata['device_kind']} ({metadata['platform']}), "
      f"{metadata.get('device_count', '?')} device(s) (rows use one); host "
      f"{metadata.get('host_cpu_count', '?')} CPUs, "
      f"{metadata.get('host_memory_available_gib', '?')} GiB available",
      f"- Software: jax {metadata['jax_version']}, jaxlib {metadata['jaxlib_version']}, "
      f"python {metadata.get('python_version', '?')}",
      f"- Command: `{metadata['command']}`",
      f"- Date: {metadata['date']}",
      f"- Commit: {provenance.get('git_commit', 'unknown')}"
      + ("" if dirty is False else f" (tree dirty: {dirty})"),
      f"- Timing: median of {settings.get('repeats', '?')} calls after "
      f"{settings.get('warmup', '?')} warm-up call(s); memory budget "
      f"{settings.get('budget_bytes', 0) / 2 ** 30:.1f} GiB",
  ]
  if peak_flops is None:
    out.append("- % of peak: '-' (no known peak for this device"
               f"{'; never computed on CPU' if metadata['platform'] == 'cpu' else ''})")
  else:
    out.append(f"- % of peak: of the device's dense bfloat16 peak, {peak_flops / 1e12:,.0f} "
               "TFLOP/s (`lclm.training.flops.peak_flops_per_device`); float32 rows are "
               "compared with the same bf16 peak")
  if plot_name:
    out += ["", f"![time and memory against length]({plot_name})"]
  by_kernel: dict[str, list[Row]] = {}
  for row in rows:
    by_kernel.setdefault(row.kernel, []).append(row)
  for kernel, mine in by_kernel.items():
    configs = list(dict.fromkeys(r.config for r in mine))
    out += ["", f"## {kernel}", ""]
    if len(configs) == 1:
      out += [f"Config: {configs[0]}.", ""]
    out.append(kernel_table(mine, peak_flops))
  if memory_check is not None:
    out += ["", "## Memory check", "", "```", format_memory_check(memory_check), "```"]
  out += [
      "", "## How to read", "",
      "- time: median wall-clock time of one call (synchronised with `block_until_ready`); "
      "compilation is never timed.",
      "- TFLOP/s: the kernel's nominal FLOP count (the same for every implementation of a "
      "group; see the docstring of its `experiments/bench_*.py` entry, or "
      "`benchmarking.attention_flops` for flash attention) / time.",
      "- % of peak: achieved FLOP/s over the device's dense bfloat16 peak "
      "(`lclm.training.flops.PEAK_BF16_FLOPS`); float32 rows are compared with the bf16 peak "
      "too (their own ceiling is lower). '-' on CPU and on devices without a known peak.",
      "- memory: compiled peak of XLA's buffer assignment (arguments + outputs + temporaries "
      "- aliases), per device; a row over the budget is compiled, not run (status skipped).",
      "- speedup / memory vs ref (vs best peer): the reference's (fastest / leanest peer's) "
      "time or bytes over this row's, at the same size, mode and dtype: > 1 means this row "
      "is better. Ratios hold better than absolute times on a loaded machine.",
      "", "## Coverage", "",
  ]
  for name, where in kernel_coverage().items():
    if where != "benchmark_kernels":
      out.append(f"- `{name}`: not in this report: {where}.")
    elif name not in by_kernel:
      out.append(f"- `{name}`: not run in this invocation (see `--kernels`).")
    else:
      out.append(f"- `{name}`: above.")
  return "\n".join(out) + "\n"


def plot_series(rows: list[Row]) -> dict[str, dict[tuple[str, str, str], dict]]:
  """What :func:`plot_report` draws: kernel -> (implementation, mode, config) -> series.

  Each series is ``{"time": [(size, ms), ...], "memory": [(size, MiB), ...]}`` sorted by
  size: time from the rows that ran, memory from every row that has it (skipped rows too).
  """
  series: dict[str, dict[tuple[str, str, str], dict]] = {}
  for row in rows:
    line = series.setdefault(row.kernel, {}).setdefault(
        (row.implementation, row.mode, row.config), {"time": [], "memory": []})
    if row.time_ms:
      line["time"].append((row.size, row.time_ms))
    if row.memory_mib:
      line["memory"].append((row.size, row.memory_mib))
  for lines in series.values():
    for line in lines.values():
      line["time"].sort()
      line["memory"].sort()
  return series


def plot_report(rows: list[Row], path: str, title: str = "") -> None:
  """Writes a PNG: one row of two log-log panels per kernel, time (ms) and compiled memory
  (MiB) against length; a colour per implementation, solid for fwd_bwd, dashed for fwd
  (a config, when a kernel has several, gets its own line)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  series = plot_series(rows)
  if not series:
    raise ValueError("plot_report: rows is empty; there is nothing to plot.")
  fig, axes = plt.subplots(len(series), 2, figsize=(13, 3.6 * len(series)), squeeze=False)
  markers = "os^vD<>pPhX*d"
  for (kernel, lines), (left, right) in zip(series.items(), axes):
    implementations = list(dict.fromkeys(impl for impl, _, _ in lines))
    configs = list(dict.fromkeys(config for _, _, config in lines))
    for (impl, mode, config), line in lines.items():
      i = implementations.index(impl)
      label = f"{impl} {mode}" + (f" [{config}]" if len(configs) > 1 else "")
      style = dict(color=f"C{i % 10}", marker=markers[configs.index(config) % len(markers)],
                   linestyle="--" if mode == "fwd" else "-", label=label)
      for ax, key in ((left, "time"), (right, "memory")):
        if line[key]:
          ax.plot(*zip(*line[key]), **style)
    for ax, what in ((left, "time (ms)"), (right, "compiled memory (MiB)")):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("length (tokens)")
      ax.set_ylabel(what)
      ax.set_title(f"{kernel}: {what.split(' (')[0]}", fontsize=10)
      ax.grid(alpha=0.3, which="both")
    right.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
  if title:
    fig.suptitle(title, fontsize=9)
  # Leave 0.4 inch at the top for the title (tight_layout alone ignores it).
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def load_results(path: str) -> tuple[list[Row], dict, dict | None]:
  """(rows, metadata, memory check or None) of a JSON file this driver wrote.

  Raises ValueError naming the file when it is not such a results file.
  """
  with open(path) as f:
    data = json.load(f)
  fields = {f.name for f in dataclasses.fields(Row)}
  if not isinstance(data, dict) or "rows" not in data or "metadata" not in data:
    raise ValueError(f"--report-from: {path} is not a results file of this driver (expected "
                     "a JSON object with 'metadata' and 'rows').")
  rows = []
  for n, row in enumerate(data["rows"]):
    if not isinstance(row, dict) or set(row) != fields:
      got = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise ValueError(f"--report-from: row {n} of {path} has fields {got}; expected "
                       f"{sorted(fields)}.")
    rows.append(Row(**row))
  return rows, data["metadata"], data.get("memory_check")


def write_report(rows: list[Row], metadata: dict, directory: str, *,
                 memory_check: dict | None = None) -> tuple[str, str | None]:
  """Writes ``<directory>/<platform>.md`` and ``<platform>_time_memory.png``; returns both
  paths (the PNG's None when there are no rows to plot). ``<platform>`` is
  :func:`platform_slug` of the metadata's device; "% of peak" uses the metadata's
  "peak_bf16_flops_per_device" (None: "-")."""
  slug = platform_slug(metadata["platform"], metadata["device_kind"])
  os.makedirs(directory, exist_ok=True)
  md_path = os.path.join(directory, f"{slug}.md")
  png_path = os.path.join(directory, f"{slug}_time_memory.png")
  peak = metadata.get("peak_bf16_flops_per_device")
  plot_name = None
  if rows:
    plot_report(rows, png_path, title=(
        f"{metadata['device_kind']} ({metadata['platform']}), jax {metadata['jax_version']}: "
        f"{metadata['command']}"))
    plot_name = os.path.basename(png_path)
  with open(md_path, "w") as f:
    f.write(format_report(rows, metadata, peak_flops=peak, memory_check=memory_check,
                          plot_name=plot_name))
  return md_path, png_path if rows else None


def _default_out(environment: dict, quick: bool, prefix: str = "kernels") -> str:
  # Accelerator tables are the project's record; CPU and quick runs go to ignored *.tmp.json.
  slug = _slug(environment["device_kind"])
  temporary = quick or environment["platform"] == "cpu"
  return os.path.join(RESULTS_DIR, f"{prefix}_{slug}{'.tmp' if temporary else ''}.json")


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m experiments.benchmark_kernels", description=__doc__.split("\n")[0])
  parser.add_argument("--kernels", default=",".join(KERNEL_BENCHMARKS),
                      help="comma-separated subset of: " + ", ".join(KERNEL_BENCHMARKS))
  parser.add_argument("--sizes", help="comma-separated sequence lengths (default: per "
                      "platform; CPU 1024,4096, accelerators 4096..32768)")
  parser.add_argument("--dtype", help="input dtype (default: float32 on CPU, bfloat16 "
                      "on accelerators)")
  parser.add_argument("--modes", default=",".join(MODES), help="subset of fwd,fwd_bwd")
  parser.add_argument("--out", help="JSON path (default: benchmarks/results/kernels_<device>"
                      ".json; .tmp.json, which git ignores, for CPU and --quick runs)")
  parser.add_argument("--report", nargs="?", const=RESULTS_DIR, metavar="DIR",
                      help="also write the markdown report DIR/<platform>.md and the plot "
                      "DIR/<platform>_time_memory.png (DIR default benchmarks/results; "
                      "<platform> is cpu or the device kind, e.g. nvidia_h100_80gb_hbm3); "
                      "the JSON then defaults to DIR/<platform>.json")
  parser.add_argument("--report-from", metavar="JSON",
                      help="measure nothing: rebuild the report from a JSON this driver wrote "
                      "(into --report DIR if given, else the JSON's directory)")
  parser.add_argument("--quick", action="store_true",
                      help="one default size, 1 warm-up and 3 repeats; no memory check")
  parser.add_argument("--warmup", type=int, help="untimed calls per program (default 2)")
  parser.add_argument("--repeats", type=int, help="timed calls per program (default 5)")
  parser.add_argument("--memory-budget-gib", type=float, help="skip running programs whose "
                      "compiled memory exceeds this (default: 60%% of available RAM on "
                      "CPU, the device's bytes_limit on accelerators)")
  parser.add_argument("--memory-check", action="store_true",
                      help="only run the memory check (ours vs reference, compile only)")
  parser.add_argument("--memory-check-len", type=int, default=16384,
                      help="sequence length of the memory check (default 16384)")
  parser.add_argument("--window-check", action="store_true",
                      help="only run the window check: forward + backward with a causal "
                      "sliding window vs dense causal, exit 1 if the time ratio misses the "
                      "target (CPU: 8K tokens, window 256, <= 0.2; accelerators: 32K, window "
                      "1024, <= 1/8)")
  parser.add_argument("--window-check-len", type=int,
                      help="sequence length of the window check (default: per platform)")
  parser.add_argument("--window-check-window", type=int,
                      help="window of the window check (default: per platform)")
  args = parser.parse_args(argv)
  if args.window_check and args.memory_check:
    parser.error("--window-check and --memory-check are separate runs; pass one of them")
  if (args.report is not None or args.report_from) and (args.window_check or
                                                        args.memory_check):
    parser.error("--report and --report-from report the kernel tables; they cannot be "
                 "combined with --window-check or --memory-check (run those separately)")
  for name in ("window_check_len", "window_check_window"):
    value = getattr(args, name)
    if value is not None and value < (1 if name == "window_check_len" else 0):
      parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
  kernels = [k for k in args.kernels.split(",") if k]
  unknown = sorted(set(kernels) - set(KERNEL_BENCHMARKS))
  if unknown:
    parser.error(f"unknown kernels {unknown}; known: {sorted(KERNEL_BENCHMARKS)}")
  modes = tuple(m for m in args.modes.split(",") if m)
  if not modes or set(modes) - set(MODES):
    parser.error(f"--modes must be a subset of {','.join(MODES)}, got {args.modes!r}")
  sizes = None
  if args.sizes:
    try:
      sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    except ValueError:
      parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
  budget = (benchmarking.memory_budget_bytes() if args.memory_budget_gib is None
            else int(args.memory_budget_gib * 2 ** 30))
  settings = Settings(
      sizes=sizes, dtype=args.dtype, modes=modes, budget_bytes=budget, quick=args.quick,
      warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
      repeats=args.repeats if args.repeats is not None else (3 if args.quick else 5))
  return args, kernels, settings


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmarks; prints the table and writes JSON (and, with ``--report``, the
  markdown report and its plot). Returns the exit code.

  Non-zero only when the memory check or the window check runs and fails.
  """
  argv = sys.argv[1:] if argv is None else argv
  args, kernels, settings = _parse_args(argv)
  if args.report_from:
    return _report_from(args.report_from, args.report)
  environment = benchmarking.describe_environment()
  metadata = dict(
      environment, command="python -m experiments.benchmark_kernels " + shlex.join(argv),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      settings=dataclasses.asdict(settings))
  print(f"{environment['device_kind']} ({environment['platform']}), jax "
        f"{environment['jax_version']}; budget {settings.budget_bytes / 2 ** 30:.1f} GiB")

  if args.window_check:
    return _run_window_check(args, settings, environment, metadata)

  rows = []
  if not args.memory_check:
    for name in kernels:
      rows.extend(KERNEL_BENCHMARKS[name](settings))
    add_ratios(rows)
    print(format_table(rows))
  check = None
  if args.memory_check or not args.quick:
    check = memory_check(args.memory_check_len)
    print(format_memory_check(check))

  if args.report is not None:
    metadata["peak_bf16_flops_per_device"] = report_peak_flops(environment)
    slug = platform_slug(environment["platform"], environment["device_kind"])
  out = args.out or (os.path.join(args.report, f"{slug}.json") if args.report is not None
                     else _default_out(environment, args.quick))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(metadata=metadata, rows=[dataclasses.asdict(r) for r in rows],
                   memory_check=check), f, indent=1, allow_nan=False)
  print(f"wrote {out}")
  if args.report is not None:
    for path in write_report(rows, metadata, args.report, memory_check=check):
      if path:
        print(f"wrote {path}")
  return 0 if check is None or check["passed"] else 1


def _report_from(path: str, directory: str | None) -> int:
  """``--report-from``: the report of an earlier run's JSON, its figures and metadata as
  measured (the header keeps that run's command, date and commit)."""
  rows, metadata, check = load_results(path)
  if "peak_bf16_flops_per_device" not in metadata:  # A JSON written without --report.
    metadata["peak_bf16_flops_per_device"] = report_peak_flops(metadata)
  directory = directory or os.path.dirname(os.path.abspath(path))
  for written in write_report(rows, metadata, directory, memory_check=check):
    if written:
      print(f"wrote {written}")
  return 0


def _run_window_check(args, settings: Settings, environment: dict, metadata: dict) -> int:
  rows, check = window_check(args.window_check_len, args.window_check_window,
                             warmup=settings.warmup, repeats=settings.repeats,
                             budget_bytes=settings.budget_bytes)
  print(format_table(rows))
  print(format_window_check(check))
  out = args.out or _default_out(environment, args.quick, prefix="window_check")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(metadata=metadata, rows=[dataclasses.asdict(r) for r in rows],
                   window_check=check), f, indent=1, allow_nan=False)
  print(f"wrote {out}")
  return 0 if check["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
