"""Measuring utilities shared by the benchmarks (GUIDE §5): time, memory, FLOPs, device.

* time: median wall-clock seconds over repeats after warm-up, each call synchronised with
  ``jax.block_until_ready``; compilation is never timed.
* memory: the compiled program's peak from XLA's buffer assignment (arguments + outputs +
  temporaries - aliased bytes). It needs no run, so a program too big to allocate can still be
  measured; on accelerators the allocator's measured ``peak_bytes_in_use`` is recorded too.
* FLOPs: the nominal count of the attention algorithm (see :func:`attention_flops`), the same
  for every implementation, so achieved TFLOP/s compare like with like.
* time budget: :func:`set_deadline` gives the run a deadline (``time.monotonic()`` seconds);
  past it :func:`measure` and :func:`measure_interleaved` compile and run nothing and return
  "skipped" measurements, so a bounded run (``make device-check``) still writes its table.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jaxlib

from lclm import provenance

MIB = 2 ** 20
OUT_OF_TIME = "not run: the run's time budget is spent"

_deadline: float | None = None


def set_deadline(deadline: float | None) -> None:
  """Measurements stop at ``deadline`` (a ``time.monotonic()`` value; None: no deadline)."""
  global _deadline
  _deadline = deadline


def out_of_time() -> bool:
  """Whether the deadline of :func:`set_deadline` has passed."""
  return _deadline is not None and time.monotonic() >= _deadline


def compile_fn(fn, *args) -> jax.stages.Compiled:
  """``jax.jit(fn)`` lowered and compiled for ``args`` (arrays or ``jax.ShapeDtypeStruct``)."""
  return jax.jit(fn).lower(*args).compile()


def time_fn(fn, *args, warmup: int = 2, repeats: int = 5) -> float:
  """Median seconds of one call of ``fn(*args)``, jitted once and warmed up.

  Args:
    fn: a function of arrays, or an already compiled ``jax.stages.Compiled``.
    *args: its arguments (concrete arrays).
    warmup: untimed calls first (at least one, so compilation is never timed).
    repeats: timed calls; the median is returned.
  """
  if repeats < 1:
    raise ValueError(f"time_fn: repeats must be >= 1, got {repeats}.")
  compiled = fn if isinstance(fn, jax.stages.Compiled) else jax.jit(fn)
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_memory_bytes(fn, *args) -> int | None:
  """Peak bytes of ``jax.jit(fn)`` for ``args`` from XLA's memory analysis, without running.

  ``fn`` may also be an already compiled ``jax.stages.Compiled`` (then ``args`` are unused).
  Peak = arguments + outputs + temporaries - bytes where an output aliases an argument.
  Returns None where the backend gives no analysis.
  """
  compiled = fn if isinstance(fn, jax.stages.Compiled) else compile_fn(fn, *args)
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def measured_peak_bytes(device=None) -> int | None:
  """The allocator's high-water mark ``peak_bytes_in_use`` of ``device``; None on CPU.

  The mark covers the whole process and never goes down, so it measures one program only
  when that program raised it (see :func:`measure`).
  """
  stats = _memory_stats(device)
  return None if stats is None or "peak_bytes_in_use" not in stats else int(
      stats["peak_bytes_in_use"])


def memory_budget_bytes(device=None, cpu_fraction: float = 0.6) -> int:
  """The most memory a benchmarked program may take before its run is skipped.

  Accelerators: the allocator's ``bytes_limit``. CPU: ``cpu_fraction`` of the memory the
  kernel reports available (``MemAvailable`` in /proc/meminfo; total RAM where that is
  missing), since the machine may be shared.
  """
  stats = _memory_stats(device)
  if stats is not None and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return int(cpu_fraction * _host_memory_bytes())


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *,
                    causal: bool, backward: bool) -> float:
  """Nominal FLOPs of attention, the FlashAttention papers' convention.

  Forward: two matmuls (Q K^T and P V) of 2 * q_len * kv_len * head_dim FLOPs each per
  (batch, head), i.e. 4 * B * H * Tq * Tk * D, halved when causal (half the logits are
  visible). Forward + backward: 3.5x the forward (the backward does 5 matmuls where the
  forward does 2, counting the recomputation of P). Softmax FLOPs are not counted, and an
  implementation that computes the masked half anyway gets no credit for it.
  """
  flops = 4.0 * batch * heads * q_len * kv_len * head_dim
  if causal:
    flops /= 2
  return flops * 3.5 if backward else flops


def causal_window_pairs(seq_len: int, window: int) -> int:
  """Visible (query, key) pairs of causal self-attention with a left window: query i sees
  keys max(i - window, 0) ... i, i.e. min(i, window) + 1 keys."""
  full = min(seq_len, window + 1)  # Queries 0 .. full-1 see all keys before them.
  return full * (full + 1) // 2 + (seq_len - full) * (window + 1)


def window_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, window: int,
                           *, backward: bool) -> float:
  """Nominal FLOPs of causal sliding-window self-attention: :func:`attention_flops`'
  convention (4 * B * H * D per visible pair, x3.5 with the backward) on the visible pairs."""
  flops = 4.0 * batch * heads * head_dim * causal_window_pairs(seq_len, window)
  return flops * 3.5 if backward else flops


def forward_and_backward(forward):
  """``forward(*inputs) -> out`` becomes ``(*inputs, d_out) -> (out, *input_gradients)``.

  The program a "fwd_bwd" measurement runs: the forward pass, then the gradient of every
  input for the cotangent ``d_out`` (pass a random one, not ones, so nothing folds away).
  """
  def run(*inputs_and_cotangent):
    *inputs, d_out = inputs_and_cotangent
    out, vjp = jax.vjp(forward, *inputs)
    return (out, *vjp(d_out))
  return run


def describe_environment(device=None) -> dict:
  """Device, software versions and host: the metadata every benchmark result carries.

  ``"provenance"`` holds :func:`lclm.provenance.collect` without a gin configuration
  (benchmarks have none): the git commit and whether the tree was dirty, flax's version,
  the process count and the UTC time besides what the flat keys say.
  """
  device = device or jax.devices()[0]
  return dict(
      platform=device.platform, device_kind=device.device_kind,
      device_count=jax.device_count(), jax_version=jax.__version__,
      jaxlib_version=jaxlib.__version__, python_version=platform.python_version(),
      host_cpu_count=os.cpu_count(),
      host_memory_available_gib=round(_host_memory_bytes() / 2 ** 30, 1),
      provenance=provenance.collect(include_gin=False))


@dataclasses.dataclass
class Measurement:
  """One program measured: time (None if not run), memory, and why a run was skipped/failed.

  status: "ok" (compiled and timed), "skipped" (compiled, not run: its memory is over the
  budget) or "failed" (did not compile or run; ``note`` says why).
  """
  status: str
  seconds: float | None = None
  memory_bytes: int | None = None
  measured_peak_bytes: int | None = None
  note: str = ""


def time_torch_cuda(call: Callable[[], object], *, warmup: int = 2,
                    repeats: int = 5) -> tuple[float, int]:
  """(median seconds, peak allocated bytes) of ``call()``, a PyTorch peer on CUDA.

  Times with CUDA events after ``warmup`` calls (at least one); the peak is PyTorch's
  allocator high-water mark over the timed calls. Imports torch only when called.
  """
  import torch

  for _ in range(max(warmup, 1)):
    call()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return statistics.median(times), torch.cuda.max_memory_allocated()


def measure_torch(forward, inputs, cotangent, *, backward: bool, warmup: int = 2,
                  repeats: int = 5) -> Measurement:
  """A PyTorch peer on JAX arrays: ``forward(*torch_tensors)`` (then ``.backward(cotangent)``
  when ``backward``), timed by :func:`time_torch_cuda`; never raises (a failure is a
  "failed" Measurement; past the deadline, "skipped"). The arrays cross by DLPack, no copy;
  with ``backward`` the floating inputs are cloned to require gradients."""
  if out_of_time():
    return Measurement("skipped", note=OUT_OF_TIME)
  import torch  # pylint: disable=import-outside-toplevel
  args = [torch.from_dlpack(a) for a in inputs]
  d_out = torch.from_dlpack(cotangent)
  if backward:
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]

  def call():
    out = forward(*args)
    if backward:
      out.backward(d_out)
    return out

  try:
    seconds, peak = time_torch_cuda(call, warmup=warmup, repeats=repeats)
  except Exception as error:  # A peer failing is a result to report.
    return Measurement("failed", note=_short_error(error))
  return Measurement("ok", seconds=seconds, measured_peak_bytes=peak)


def measure(fn, *args, budget_bytes: int, warmup: int = 2, repeats: int = 5) -> Measurement:
  """Compiles ``fn`` for ``args`` once; records its memory and, if within budget, its time.

  Never raises for a failure of ``fn``: the error becomes a "failed" Measurement. Past the
  deadline (:func:`set_deadline`) nothing is compiled: a "skipped" Measurement.
  """
  if out_of_time():
    return Measurement("skipped", note=OUT_OF_TIME)
  try:
    compiled = compile_fn(fn, *args)
    memory = compiled_memory_bytes(compiled)
  except Exception as error:  # Any lowering/compile error is a result to report.
    return Measurement("failed", note=_short_error(error))
  if memory is not None and memory > budget_bytes:
    return Measurement("skipped", memory_bytes=memory, note=(
        f"not run: compiled memory {memory / MIB:,.0f} MiB > budget "
        f"{budget_bytes / MIB:,.0f} MiB"))
  peak_before = measured_peak_bytes()
  try:
    seconds = time_fn(compiled, *args, warmup=warmup, repeats=repeats)
  except Exception as error:
    return Measurement("failed", memory_bytes=memory, note=_short_error(error))
  peak_after = measured_peak_bytes()
  raised = peak_after is not None and (peak_before is None or peak_after > peak_before)
  return Measurement("ok", seconds=seconds, memory_bytes=memory,
                     measured_peak_bytes=peak_after if raised else None)


def measure_interleaved(programs, *, budget_bytes: int, warmup: int = 2,
                        repeats: int = 5) -> list[Measurement]:
  """Like :func:`measure` for several ``(fn, args)`` programs whose times will be compared.

  All are compiled first; then the timed calls alternate between the programs (one call of
  each per round), so a change in machine load during the run hits them alike and their
  ratio holds better than with back-to-back measurements. A program that fails or is over
  the budget is left out of the rounds. No allocator peak is recorded (the programs share
  the process's high-water mark).
  """
  if repeats < 1:
    raise ValueError(f"measure_interleaved: repeats must be >= 1, got {repeats}.")
  results, runnable = [], []
  for fn, args in programs:
    if out_of_time():
      results.append(Measurement("skipped", note=OUT_OF_TIME))
      continue
    try:
      compiled = compile_fn(fn, *args)
      memory = compiled_memory_bytes(compiled)
    except Exception as error:
      results.append(Measurement("failed", note=_short_error(error)))
      continue
    if memory is not None and memory > budget_bytes:
      results.append(Measurement("skipped", memory_bytes=memory, note=(
          f"not run: compiled memory {memory / MIB:,.0f} MiB > budget "
          f"{budget_bytes / MIB:,.0f} MiB")))
      continue
    results.append(Measurement("ok", memory_bytes=memory))
    runnable.append((len(results) - 1, compiled, args))
  times = {i: [] for i, _, _ in runnable}
  for round_ in range(max(warmup, 1) + repeats):
    for i, compiled, args in runnable:
      if results[i].status != "ok":
        continue
      try:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        elapsed = time.perf_counter() - start
      except Exception as error:
        results[i] = Measurement("failed", memory_bytes=results[i].memory_bytes,
                                 note=_short_error(error))
        continue
      if round_ >= max(warmup, 1):
        times[i].append(elapsed)
  for i, seconds in times.items():
    if results[i].status == "ok":
      results[i].seconds = statistics.median(seconds)
  return results


def _memory_stats(device):
  device = device or jax.devices()[0]
  try:
    return device.memory_stats()
  except Exception:  # Some backends raise instead of returning None.
    return None


def _host_memory_bytes() -> int:
  fields = {}
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024  # Values are in kB.
  except OSError:
    pass
  if "MemAvailable" in fields or "MemTotal" in fields:
    return fields.get("MemAvailable", fields.get("MemTotal"))
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _short_error(error: Exception, limit: int = 200) -> str:
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[:limit - 3] + "..."
