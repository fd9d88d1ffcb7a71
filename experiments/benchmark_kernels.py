"""One command that benchmarks every kernel against its reference and its peers (GUIDE §5).

    python -m experiments.benchmark_kernels [--kernels flash_attention] [--sizes 1024,4096]
        [--dtype bfloat16] [--modes fwd,fwd_bwd] [--out benchmarks/results/x.json] [--quick]
        [--report [DIR]] [--time-budget SECONDS] [--tpu-memory]
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

Roofline column: the rows of our default implementation carry :func:`roofline` figures from
the kernel's ``pallas_kernels/<op>/cost.py`` (FLOPs and HBM bytes per call of the *Pallas*
block plan, TPU plan for v5e / v6e, GPU plan for the H100, whatever path the row timed; "-"
where the op has no model). ``--time-budget SECONDS`` bounds the measuring (each kernel gets an
equal share of what is left when it starts; rows past it are "skipped" and the tables are
still written: ``make device-check`` relies on it). ``--tpu-memory`` adds the TPU compiler's
temporary HBM for forward + backward of flash attention and SSD at realistic sizes
(:func:`tpu_memory_figures`: compile-only v5e through ``$LCLM_LIBTPU_PATH``) to the output,
JSON and report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
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
  roofline: for our default implementation's rows, :func:`roofline`'s figures from the
  kernel's ``cost.py`` (the Pallas block plan per target backend); None elsewhere.
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
  roofline: dict | None = None


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
# The roofline column: FLOPs and HBM bytes per call from a kernel's own block plan.

# (chip, backend whose Pallas plan runs there): the TPU plan bounds v5e and v6e, the GPU
# plan the H100, whatever platform this run timed (on CPU the rows timed the XLA path).
ROOFLINE_CHIPS = (("v5e", "tpu"), ("v6e", "tpu"), ("h100", "gpu"))
ROOFLINE_HEADER = (
    "roofline: FLOPs and HBM bytes per call of the *Pallas* block plan for each target "
    "backend (`pallas_kernels/<op>/cost.py`: TPU plan for v5e and v6e, GPU plan for the "
    "H100), whatever path this row timed (on CPU, the XLA path); bound = max(FLOPs / dense "
    "bf16 rate, bytes / HBM bandwidth) per chip (`pallas_kernels/_common/roofline.py`), and "
    "whether memory or compute sets it. Only our default implementation's rows carry it; "
    "'-' where the op has no cost model (or it does not cover the case).")


def load_cost(module: str, function: str) -> Callable:
  """``pallas_kernels.<module>.<function>``: a kernel's cost model (every kernel has one; a
  broken one fails loudly rather than turning its column into "-")."""
  import importlib
  return getattr(importlib.import_module(f"pallas_kernels.{module}"), function)


def roofline(cost_of: Callable[[str], object] | None) -> dict | None:
  """The roofline figures of one row from ``cost_of(backend) -> roofline.Cost``.

  ``cost_of`` is called for "tpu" and "gpu"; a backend whose model raises
  NotImplementedError (or any error: the note says which) gets None, as does every chip when
  ``cost_of`` is None (no cost model). Returns ``{"plans": {backend: {"flops", "hbm_bytes",
  "parts"} or None}, "bound_us": {chip: µs or None}, "bound_by": {chip: "memory" |
  "compute" or None}, "note": str}``, or None when no backend has a cost.
  """
  if cost_of is None:
    return None
  plans, notes, costs = {}, [], {}
  for backend in dict.fromkeys(b for _, b in ROOFLINE_CHIPS):
    try:
      cost = cost_of(backend)
    except NotImplementedError as error:
      cost = None
      notes.append(f"{backend}: not modelled ({error})" if str(error) else
                   f"{backend}: not modelled")
    except Exception as error:  # A broken cost model is reported, never fatal.
      cost = None
      notes.append(f"{backend}: {type(error).__name__}: {error}"[:160])
    costs[backend] = cost
    plans[backend] = None if cost is None else dict(
        flops=float(cost.flops), hbm_bytes=float(cost.hbm_bytes),
        parts={name: float(value) for name, value in cost.parts})
  if all(cost is None for cost in costs.values()):
    return None if not notes else dict(plans=plans, bound_us={c: None for c, _ in
                                                              ROOFLINE_CHIPS},
                                       bound_by={c: None for c, _ in ROOFLINE_CHIPS},
                                       note="; ".join(notes))
  bound_us, bound_by = {}, {}
  for chip, backend in ROOFLINE_CHIPS:
    cost = costs[backend]
    bound_us[chip] = None if cost is None else cost.bound_seconds(chip) * 1e6
    bound_by[chip] = None if cost is None else cost.bound_by(chip)
  return dict(plans=plans, bound_us=bound_us, bound_by=bound_by, note="; ".join(notes))


def attach_roofline(rows: list[Row], figures: dict | None) -> None:
  """Sets ``figures`` (:func:`roofline`) on the rows of our default implementation."""
  for row in rows:
    if row.role == OURS and "(default=" in row.implementation:
      row.roofline = figures


def _plan_figure(row: Row, key: str, scale: float) -> str | None:
  """"tpu / gpu" figures of a row's plans (one number when they agree); None without."""
  plans = (row.roofline or {}).get("plans") or {}
  values = [None if plans.get(b) is None else plans[b][key] / scale for b in ("tpu", "gpu")]
  if all(v is None for v in values):
    return None
  text = ["-" if v is None else _fmt_sig(v) for v in values]
  return text[0] if text[0] == text[1] else f"{text[0]} / {text[1]}"


def _bound(row: Row, chip: str) -> float | None:
  return ((row.roofline or {}).get("bound_us") or {}).get(chip)


def _bound_by(row: Row) -> str | None:
  by = (row.roofline or {}).get("bound_by") or {}
  values = [by.get(chip) or "-" for chip, _ in ROOFLINE_CHIPS]
  if all(v == "-" for v in values):
    return None
  return values[0] if len(set(values)) == 1 else "/".join(values)


# Roofline columns of the printed table and the report: header, value of a row (text or None).
_ROOFLINE_COLUMNS = (
    ("GFLOP tpu/gpu", lambda r: _plan_figure(r, "flops", 1e9)),
    ("HBM MiB tpu/gpu", lambda r: _plan_figure(r, "hbm_bytes", 2 ** 20)),
    ("v5e µs", lambda r: None if _bound(r, "v5e") is None else _fmt_sig(_bound(r, "v5e"))),
    ("v6e µs", lambda r: None if _bound(r, "v6e") is None else _fmt_sig(_bound(r, "v6e"))),
    ("H100 µs", lambda r: None if _bound(r, "h100") is None else _fmt_sig(_bound(r, "h100"))),
    ("bound v5e/v6e/H100", _bound_by),
)


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
    candidates.append(_pallas_peer(
        "pallas.ops.gpu mosaic attention", "jax.experimental.pallas.ops.gpu.attention_mgpu",
        "bthd", lambda module: _mgpu_attention(module, scale, causal)))
  if platform == "tpu":
    candidates.append(_pallas_peer(
        "pallas.ops.tpu flash", "jax.experimental.pallas.ops.tpu.flash_attention", "bhtd",
        lambda module: lambda q, k, v: module.flash_attention(
            q, k, v, causal=causal, sm_scale=scale)))
    candidates.append(_pallas_peer(
        "pallas.ops.tpu splash", "jax.experimental.pallas.ops.tpu.splash_attention", "bhtd",
        lambda module: _splash_attention(module, scale, causal)))
  if platform in ("gpu", "tpu"):
    candidates.append(_pallas_peer(
        "tokamax", "tokamax", "bthd", lambda module: lambda q, k, v: (
            module.dot_product_attention(q, k, v, scale=scale, is_causal=causal))))
  return candidates


def _mgpu_attention(module, scale: float, causal: bool):
  """jax's Mosaic-GPU (Hopper) attention on [batch, len, heads, head_dim], blocks 64 x 128.
  It applies no softmax scale, so q is pre-scaled; its backward has no causal mask yet (the
  fwd_bwd row then says NotImplementedError). It computes in float16 (jax 0.11.2 on an H200
  refused bfloat16 inputs: "src had type bfloat16 and dst had type float16"), so the inputs
  are cast to float16 and the output back: float16 and bfloat16 run at one tensor-core rate."""
  config = module.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                               causal=causal, block_q_dkv=64, block_kv_dkv=64,
                               block_q_dq=64, block_kv_dq=64)
  f16 = jnp.float16
  return lambda q, k, v: module.attention(
      (q * scale).astype(f16), k.astype(f16), v.astype(f16), config=config).astype(q.dtype)


def _splash_attention(module, scale: float, causal: bool):
  """jax's splash attention on [batch, heads, len, head_dim]: a single-device kernel per
  batch row (vmapped), a lazy causal (or full) mask per head; q pre-scaled (splash takes no
  scale)."""
  def forward(q, k, v):
    _, h, t, _ = q.shape
    one = module.CausalMask((t, t)) if causal else module.FullMask((t, t))
    kernel = module.make_splash_mha_single_device(module.MultiHeadMask([one] * h))
    return jax.vmap(kernel)((q * scale).astype(q.dtype), k, v)
  return forward


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
      first = len(rows)
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
      attach_roofline(rows[first:], flash_roofline(
          batch=b, seq_len=t, heads=h, head_dim=d, dtype=dtype, causal=causal,
          backward=mode == "fwd_bwd"))
  return rows


def flash_roofline(*, batch: int, seq_len: int, heads: int, head_dim: int, dtype: str,
                   causal: bool, backward: bool) -> dict | None:
  """:func:`roofline` of self-attention from ``pallas_kernels.flash_attention.cost``
  (``flash_cost``) at the block sizes a default call runs with on each backend
  (``flash_attention.ops.block_sizes``); None while that model does not exist."""
  cost = load_cost("flash_attention.cost", "flash_cost")
  if cost is None:
    return None
  # pylint: disable=import-outside-toplevel
  from pallas_kernels._common import masks as masks_lib
  from pallas_kernels.flash_attention import ops as flash_ops
  mask = masks_lib.CausalMask() if causal else None

  def cost_of(backend):
    blocks = flash_ops.block_sizes(flash_ops.backend_spec(backend), seq_len, seq_len, {},
                                   mask if mask is not None else masks_lib.FullMask())
    return cost(batch=batch, q_len=seq_len, kv_len=seq_len, num_heads=heads,
                num_kv_heads=heads, head_dim=head_dim, dtype=dtype, mask=mask,
                backend=backend, backward=backward, **blocks)
  return roofline(cost_of)


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
# The TPU compiler's own memory plan (compile-only libtpu topology; no TPU needed).

LIBTPU_ENV = "LCLM_LIBTPU_PATH"
TPU_MEMORY_TOPOLOGY = "v5e:2x2"
_TPU_MEMORY_MARK = "TPU_MEMORY_JSON "


def tpu_memory_programs() -> list[tuple[str, str, Callable, tuple, int]]:
  """(name, config, program, argument specs, input bytes) of the issue-18 memory figures.

  Forward + backward (:func:`benchmarking.forward_and_backward`, a random cotangent as the
  last argument) of our Pallas kernels at realistic sizes, bf16: flash attention (B2 T8192
  H16 D128, causal; inputs q, k, v) and SSD (B8 T8192, 24 heads, P64, one group, N64;
  inputs x, dt, A, B, C). "input bytes" counts the op's inputs, not the cotangent.
  """
  from pallas_kernels.ssd import ssd  # pylint: disable=import-outside-toplevel

  bf16, f32 = jnp.bfloat16, jnp.float32
  spec = jax.ShapeDtypeStruct
  nbytes = lambda specs: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in specs)
  qkv = tuple(spec((2, 8192, 16, 128), bf16) for _ in range(3))
  flash = benchmarking.forward_and_backward(
      lambda q, k, v: flash_attention(q, k, v, is_causal=True, implementation="pallas"))
  ssd_in = (spec((8, 8192, 24, 64), bf16), spec((8, 8192, 24), f32), spec((24,), f32),
            spec((8, 8192, 1, 64), bf16), spec((8, 8192, 1, 64), bf16))
  ssd_fn = benchmarking.forward_and_backward(
      lambda x, dt, a, b, c: ssd(x, dt, a, b, c, implementation="pallas"))
  return [
      ("flash_attention", "B2 T8192 H16 D128 bf16 causal, fwd+bwd", flash,
       qkv + (qkv[0],), nbytes(qkv)),
      ("ssd", "B8 T8192 H24 P64 G1 N64 bf16, fwd+bwd", ssd_fn,
       ssd_in + (ssd_in[0],), nbytes(ssd_in)),
  ]


def _tpu_memory_child(topology: str) -> None:
  """In a process started with libtpu (``TPU_LIBRARY_PATH``, ``JAX_PLATFORMS=cpu``):
  compiles :func:`tpu_memory_programs` for ``topology`` and prints their memory analysis as
  one JSON line after ``_TPU_MEMORY_MARK``."""
  # pylint: disable=import-outside-toplevel
  import time

  from jax.experimental import topologies

  from pallas_kernels._common import dispatch
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh([devices[0]], ("x",)),
                                        jax.sharding.PartitionSpec())
  results = []
  for name, config, fn, args, input_bytes in tpu_memory_programs():
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    entry = dict(kernel=name, config=config, input_bytes=input_bytes)
    start = time.perf_counter()
    try:
      with dispatch.target_platform("tpu"):
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
      entry.update(temp_bytes=int(stats.temp_size_in_bytes),
                   argument_bytes=int(stats.argument_size_in_bytes),
                   output_bytes=int(stats.output_size_in_bytes),
                   temp_over_inputs=stats.temp_size_in_bytes / input_bytes)
    except Exception as error:  # A kernel that does not compile is a figure to report.
      entry["error"] = benchmarking._short_error(error, 300)  # pylint: disable=protected-access
    entry["compile_s"] = round(time.perf_counter() - start, 1)
    results.append(entry)
  print(_TPU_MEMORY_MARK + json.dumps(results), flush=True)


def tpu_memory_figures(libtpu: str | None = None, *, topology: str = TPU_MEMORY_TOPOLOGY,
                       timeout: float = 900) -> dict:
  """The TPU compiler's temporary HBM for forward + backward of flash attention and SSD.

  Compiles :func:`tpu_memory_programs` for a compile-only ``topology`` in a fresh Python
  with libtpu (``libtpu``, else ``$LCLM_LIBTPU_PATH``, else ``$TPU_LIBRARY_PATH``), as
  ``tests/pallas_kernels/libtpu_compile.py`` does, and returns ``{"topology", "programs":
  [{kernel, config, input_bytes, temp_bytes, argument_bytes, output_bytes,
  temp_over_inputs, compile_s} or {..., "error"}]}``; with no libtpu, or when the child
  fails, ``{"topology", "error"}``. Issue 18's figures before its fixes: 2.34x (flash) and
  16.4x (SSD) of the inputs.
  """
  import subprocess  # pylint: disable=import-outside-toplevel
  libtpu = libtpu or os.environ.get(LIBTPU_ENV) or os.environ.get("TPU_LIBRARY_PATH")
  if not libtpu or not os.path.exists(libtpu):
    return dict(topology=topology, error=(
        f"no libtpu.so (set {LIBTPU_ENV} to one, e.g. unzip libtpu/libtpu.so from a libtpu "
        f"wheel); got {libtpu!r}"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, TPU_LIBRARY_PATH=libtpu, JAX_PLATFORMS="cpu")
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  code = ("from experiments.benchmark_kernels import _tpu_memory_child; "
          f"_tpu_memory_child({topology!r})")
  try:
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, text=True,
                          capture_output=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return dict(topology=topology, error=f"compile-only run timed out after {timeout:.0f} s")
  for line in proc.stdout.splitlines():
    if line.startswith(_TPU_MEMORY_MARK):
      return dict(topology=topology, programs=json.loads(line[len(_TPU_MEMORY_MARK):]))
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return dict(topology=topology, error=f"exit {proc.returncode}: " + " | ".join(tail)[-400:])


def format_tpu_memory(figures: dict) -> str:
  """Markdown of :func:`tpu_memory_figures`: a table, or the reason there is none."""
  head = (f"Compiled for a compile-only `{figures['topology']}` topology (libtpu, Mosaic's "
          "passes included); `memory_analysis()` temporary bytes of forward + backward over "
          "the op's input bytes. Issue 18 measured 2.34x (flash attention) and 16.4x (SSD) "
          "before its fixes.")
  if "error" in figures:
    return head + f"\n\nNot measured: {figures['error']}."
  lines = [head, "", "| kernel | config | inputs (MiB) | temp (MiB) | temp / inputs | "
           "compile (s) |", "|---|---|---:|---:|---:|---:|"]
  for p in figures["programs"]:
    mib = lambda key: "-" if key not in p else f"{p[key] / benchmarking.MIB:,.0f}"
    ratio = f"{p['temp_over_inputs']:.2f}x" if "temp_over_inputs" in p else (
        "failed: " + _cell(p.get("error", "?")))
    lines.append(f"| {p['kernel']} | {p['config']} | {mib('input_bytes')} | "
                 f"{mib('temp_bytes')} | {ratio} | {p.get('compile_s', '-')} |")
  return "\n".join(lines)


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

  Columns with no figure in any row (e.g. measured peak on CPU) are left out; the roofline
  columns (:data:`_ROOFLINE_COLUMNS`) come before the note when some row has them.
  """
  fmt_cell = lambda value, fmt: "-" if value is None else fmt.format(value)
  columns = [(h, (lambda r, f=f, fmt=fmt: fmt_cell(getattr(r, f), fmt)),
              fmt != "{}" or f == "size")
             for h, f, fmt in _COLUMNS
             if any(getattr(r, f) not in (None, "") for r in rows)]
  if any(r.roofline for r in rows):
    at = len(columns) - (1 if columns and columns[-1][0] == "note" else 0)
    columns[at:at] = [(h, (lambda r, v=v: v(r) or "-"), True) for h, v in _ROOFLINE_COLUMNS]
  cells = [[h for h, _, _ in columns]]
  for row in rows:
    cells.append([value(row) for _, value, _ in columns])
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  lines = []
  for n, line in enumerate(cells):
    lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                           for c, w, (_, _, num) in zip(line, widths, columns)).rstrip())
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  out = "\n".join(lines)
  if any(r.roofline for r in rows):
    out += "\n" + ROOFLINE_HEADER
  return out


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
  try:  # lclm's training stack needs flax; a bare accelerator machine may lack it.
    from lclm.training import flops  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    print(f"% of peak not available: {error}", file=sys.stderr)
    return None
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


def _as_is(text: str) -> str:
  """Already formatted text of a numeric column (aligned right in the report)."""
  return text


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
  if any(r.roofline for r in rows):  # Before the note: the kernel's block-plan figures.
    columns[-1:-1] = [(h, (lambda r, p, v=v: v(r)), str if h.startswith("bound") else _as_is)
                      for h, v in _ROOFLINE_COLUMNS]
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
                  memory_check: dict | None = None, plot_name: str | None = None,
                  tpu_memory: dict | None = None) -> str:
  """The markdown report of one run: header, one table per kernel, the plot, notes, footer.

  Args:
    rows: the run's rows, ratios already added (:func:`add_ratios`).
    metadata: the run's metadata (``main``'s: :func:`benchmarking.describe_environment` plus
      "command", "date" and "settings").
    peak_flops: the device's dense bf16 peak FLOP/s for "% of peak" (None: "-" everywhere;
      always None on CPU).
    memory_check: :func:`memory_check`'s result when the run made one.
    plot_name: file name of the plot, linked below the header when given.
    tpu_memory: :func:`tpu_memory_figures`' result when the run made it.
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
  if any(r.roofline for r in rows):
    out.append("- " + ROOFLINE_HEADER[0].upper() + ROOFLINE_HEADER[1:])
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
  if tpu_memory is not None:
    out += ["", "## TPU compiler memory (compile-only)", "", format_tpu_memory(tpu_memory)]
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
    if right.get_legend_handles_labels()[0]:  # Rows without time or memory draw nothing.
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
  optional = {"roofline"}  # Added later: older results files lack it.
  rows = []
  for n, row in enumerate(data["rows"]):
    if not isinstance(row, dict) or not fields - optional <= set(row) <= fields:
      got = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise ValueError(f"--report-from: row {n} of {path} has fields {got}; expected "
                       f"{sorted(fields)}.")
    rows.append(Row(**row))
  return rows, data["metadata"], data.get("memory_check")


def load_tpu_memory(path: str) -> dict | None:
  """The "tpu_memory" figures of a results JSON (None when the run made none)."""
  with open(path) as f:
    return json.load(f).get("tpu_memory")


def write_report(rows: list[Row], metadata: dict, directory: str, *,
                 memory_check: dict | None = None, tpu_memory: dict | None = None,
                 plot: bool = True) -> tuple[str, str | None]:
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
  if rows and plot:
    try:
      plot_report(rows, png_path, title=(
          f"{metadata['device_kind']} ({metadata['platform']}), jax "
          f"{metadata['jax_version']}: {metadata['command']}"))
      plot_name = os.path.basename(png_path)
    except ImportError as error:  # No matplotlib (a bare accelerator machine): tables only.
      print(f"no plot: {error}", file=sys.stderr)
  with open(md_path, "w") as f:
    f.write(format_report(rows, metadata, peak_flops=peak, memory_check=memory_check,
                          plot_name=plot_name, tpu_memory=tpu_memory))
  return md_path, png_path if plot_name else None


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
  parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="stop measuring after this many seconds (each kernel gets an equal "
                      "share of what is left when it starts); rows not measured say so and "
                      "the table is still written")
  parser.add_argument("--no-plot", action="store_true",
                      help="with --report: write the markdown without the PNG plot")
  parser.add_argument("--tpu-memory", action="store_true",
                      help="also compile forward + backward of flash attention and SSD for a "
                      "compile-only v5e topology (needs $LCLM_LIBTPU_PATH) and report the "
                      "compiler's temporary bytes over the input bytes")
  args = parser.parse_args(argv)
  if args.window_check and args.memory_check:
    parser.error("--window-check and --memory-check are separate runs; pass one of them")
  if args.time_budget is not None and not args.time_budget > 0:
    parser.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
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


def run_kernels(kernels: list[str], settings: Settings,
                time_budget: float | None = None) -> list[Row]:
  """Rows of every kernel of ``kernels`` in order, ratios added.

  With ``time_budget`` (seconds), each kernel gets an equal share of the time left when it
  starts (:func:`benchmarking.set_deadline`; a kernel that finishes early leaves its time to
  the next); past its deadline its remaining rows are "skipped" without compiling. The
  deadline of the whole run stays set afterwards (later steps check
  :func:`benchmarking.out_of_time`).
  """
  import time  # pylint: disable=import-outside-toplevel
  end = None if time_budget is None else time.monotonic() + time_budget
  rows = []
  try:
    for n, name in enumerate(kernels):
      if end is not None:
        benchmarking.set_deadline(time.monotonic() + (end - time.monotonic()) /
                                  (len(kernels) - n))
      rows.extend(KERNEL_BENCHMARKS[name](settings))
  finally:
    benchmarking.set_deadline(end)
  add_ratios(rows)
  return rows


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmarks; prints the table and writes JSON (and, with ``--report``, the
  markdown report and its plot). Returns the exit code.

  Non-zero only when the memory check or the window check runs and fails.
  """
  argv = sys.argv[1:] if argv is None else argv
  try:
    return _main(argv)
  finally:
    benchmarking.set_deadline(None)  # A --time-budget ends with its run.


def _main(argv: list[str]) -> int:
  args, kernels, settings = _parse_args(argv)
  if args.report_from:
    return _report_from(args.report_from, args.report, plot=not args.no_plot)
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
    rows = run_kernels(kernels, settings, args.time_budget)
    print(format_table(rows))
  check = None
  if (args.memory_check or not args.quick) and not benchmarking.out_of_time():
    check = memory_check(args.memory_check_len)
    print(format_memory_check(check))
  tpu_memory = None
  if args.tpu_memory:
    tpu_memory = tpu_memory_figures()
    print(format_tpu_memory(tpu_memory))

  if args.report is not None:
    metadata["peak_bf16_flops_per_device"] = report_peak_flops(environment)
    slug = platform_slug(environment["platform"], environment["device_kind"])
  out = args.out or (os.path.join(args.report, f"{slug}.json") if args.report is not None
                     else _default_out(environment, args.quick))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(metadata=metadata, rows=[dataclasses.asdict(r) for r in rows],
                   memory_check=check, tpu_memory=tpu_memory), f, indent=1, allow_nan=False)
  print(f"wrote {out}")
  if args.report is not None:
    for path in write_report(rows, metadata, args.report, memory_check=check,
                             tpu_memory=tpu_memory, plot=not args.no_plot):
      if path:
        print(f"wrote {path}")
  return 0 if check is None or check["passed"] else 1


def _report_from(path: str, directory: str | None, plot: bool = True) -> int:
  """``--report-from``: the report of an earlier run's JSON, its figures and metadata as
  measured (the header keeps that run's command, date and commit)."""
  rows, metadata, check = load_results(path)
  tpu_memory = load_tpu_memory(path)
  if "peak_bf16_flops_per_device" not in metadata:  # A JSON written without --report.
    metadata["peak_bf16_flops_per_device"] = report_peak_flops(metadata)
  directory = directory or os.path.dirname(os.path.abspath(path))
  for written in write_report(rows, metadata, directory, memory_check=check,
                              tpu_memory=tpu_memory, plot=plot):
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
