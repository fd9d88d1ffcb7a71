"""Kernel benchmark entry for ``lightning_attention`` (GUIDE §5).

``bench_lightning_attention(settings)`` returns :class:`benchmark_kernels.Row` s for: our op
(default dispatch, and the chunked XLA path on accelerators), the token-by-token reference,
and as peers ``flash_attention`` (causal softmax attention at the same token count: what a
linear-attention layer replaces) and, on GPU, flash-linear-attention's Triton
``chunk_simple_gla`` (the same recurrence with a constant per-head log-decay; PyTorch, timed
with CUDA events) when importable, reported as "not importable" otherwise.

Sizes: CPU 1K and 4K tokens (quick: 1K), float32, B1 H8 D64; accelerators 4K ... 64K tokens
(quick: 4K), bfloat16, B1 H16 D128.

FLOPs are nominal, the same for every implementation of the op: per (batch, head) and
token, the chunked algorithm at chunk 64: 2 * 64 * (d_k + d_v) (intra-chunk Q K^T and P V)
+ 4 * d_k * d_v (Q S and K^T V); x3.5 with the backward (it recomputes the states and
Q K^T, dO V^T, and does four more products), the convention of the attention FLOPs. The
flash-attention peer row counts causal-attention FLOPs.
"""

from __future__ import annotations

import importlib
import sys

import jax
import numpy as np

from experiments import benchmarking
from experiments.benchmark_kernels import (OURS, PEER, REFERENCE, Row, attach_roofline,
                                           load_cost, roofline, row_from_measurement)
from pallas_kernels import flash_attention
from pallas_kernels.lightning_attention import lightning_attention

KERNEL = "lightning_attention"
NOMINAL_CHUNK = 64


def _progress(row: Row) -> None:
  time_text = "-" if row.time_ms is None else f"{row.time_ms:.2f} ms"
  print(f"  {row.kernel} T={row.size} {row.mode} {row.implementation}: {row.status} "
        f"{time_text} {row.note}".rstrip(), file=sys.stderr, flush=True)


def lightning_flops(batch: int, heads: int, seq_len: int, d_k: int, d_v: int, *,
                    backward: bool) -> float:
  """Nominal FLOPs of chunked lightning attention (see the module docstring)."""
  per_token = 2.0 * NOMINAL_CHUNK * (d_k + d_v) + 4.0 * d_k * d_v
  flops = batch * heads * seq_len * per_token
  return flops * 3.5 if backward else flops


def _defaults(platform: str, quick: bool) -> dict:
  if platform == "cpu":
    sizes = (1024,) if quick else (1024, 4096)
    return dict(sizes=sizes, dtype="float32", batch=1, heads=8, head_dim=64)
  sizes = (4096,) if quick else (4096, 8192, 16384, 32768, 65536)
  return dict(sizes=sizes, dtype="bfloat16", batch=1, heads=16, head_dim=128)


def _decay(heads: int):
  """ALiBi-slope decays exp(-2^(-8 (h + 1) / H)), as the lightning layer uses."""
  return np.exp(-(2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)))


def _candidates(platform: str, heads: int):
  """(name, role, forward(q, k, v) or None, note)."""
  decay = _decay(heads)
  ours = lambda impl: lambda q, k, v: lightning_attention(q, k, v, decay=decay,
                                                          implementation=impl)
  default = "xla" if platform == "cpu" else "pallas"
  out = [(f"lclm (default={default})", OURS, ours(None), "")]
  if platform != "cpu":
    out.append(("lclm xla", OURS, ours("xla"), ""))
  out.append(("reference", REFERENCE, ours("reference"), ""))
  out.append(("flash_attention causal (peer)", PEER,
              lambda q, k, v: flash_attention(q, k, v, is_causal=True), ""))
  return out


def _fla_peer():
  """flash-linear-attention's chunk_simple_gla, or the reason it cannot run here."""
  try:
    torch = importlib.import_module("torch")
    module = importlib.import_module("fla.ops.simple_gla")
    fn = module.chunk_simple_gla
  except Exception as error:  # absent or broken: report, never fail
    return None, f"not importable: {type(error).__name__}: {error}"[:200]
  if not torch.cuda.is_available():
    return None, "not importable: torch sees no CUDA device"
  return (torch, fn), ""


def _time_fla(torch, fn, b, t, h, d, heads_decay, dtype, mode, warmup, repeats):
  """Median seconds and peak bytes of fla's chunk_simple_gla (CUDA events)."""
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  gen = torch.Generator(device="cuda").manual_seed(t)
  make = lambda: torch.randn(b, t, h, d, device="cuda", dtype=tdtype, generator=gen)
  q, k, v, d_out = make(), make(), make(), make()
  # A constant log-decay per head and token: g[b, t, h] = log λ_h.
  g = torch.log(torch.tensor(heads_decay, device="cuda", dtype=torch.float32))
  g = g.view(1, 1, h).expand(b, t, h).contiguous()
  if mode == "fwd_bwd":
    for x in (q, k, v):
      x.requires_grad_(True)

  def run():
    out = fn(q, k, v, g=g, scale=1.0, output_final_state=False)
    out = out[0] if isinstance(out, tuple) else out
    if mode == "fwd_bwd":
      out.backward(d_out)
    return out

  return benchmarking.time_torch_cuda(run, warmup=warmup, repeats=repeats)


def bench_lightning_attention(settings) -> list[Row]:
  """Causal lightning attention, q/k/v [B, T, H, D], per-head ALiBi decays."""
  platform = jax.default_backend()
  defaults = _defaults(platform, settings.quick)
  sizes = settings.sizes or defaults["sizes"]
  dtype = settings.dtype or defaults["dtype"]
  b, h, d = defaults["batch"], defaults["heads"], defaults["head_dim"]
  config = f"B{b} H{h} D{d} causal decay"
  candidates = _candidates(platform, h)
  fla, fla_note = _fla_peer() if platform == "gpu" else (None, "")
  rows = []
  for t in sizes:
    keys = jax.random.split(jax.random.key(t), 4)
    q, k, v, d_out = (jax.random.normal(key, (b, t, h, d), dtype) for key in keys)
    for mode in settings.modes:
      backward = mode == "fwd_bwd"
      flops = lightning_flops(b, h, t, d, d, backward=backward)
      first = len(rows)
      for name, role, forward, note in candidates:
        fields = dict(kernel=KERNEL, config=config, size=t, mode=mode, dtype=dtype,
                      implementation=name, role=role)
        if forward is None:
          rows.append(Row(status="failed", note=note, **fields))
          continue
        fn = benchmarking.forward_and_backward(forward) if backward else forward
        args = (q, k, v, d_out) if backward else (q, k, v)
        measurement = benchmarking.measure(fn, *args, budget_bytes=settings.budget_bytes,
                                           warmup=settings.warmup, repeats=settings.repeats)
        row_flops = (benchmarking.attention_flops(b, h, t, t, d, causal=True, backward=backward)
                     if name.startswith("flash_attention") else flops)
        rows.append(row_from_measurement(measurement, flops=row_flops, **fields))
        _progress(rows[-1])
      if platform == "gpu":
        fields = dict(kernel=KERNEL, config=config, size=t, mode=mode, dtype=dtype,
                      implementation="fla chunk_simple_gla (peer)", role=PEER)
        if fla is None:
          rows.append(Row(status="failed", note=fla_note, **fields))
        elif benchmarking.out_of_time():
          rows.append(Row(status="skipped", note=benchmarking.OUT_OF_TIME, **fields))
        else:
          try:
            seconds, peak = _time_fla(*fla, b, t, h, d, _decay(h), dtype, mode,
                                      settings.warmup, settings.repeats)
            rows.append(Row(status="ok", time_ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                            measured_peak_mib=peak / benchmarking.MIB, **fields))
          except Exception as error:  # a peer that breaks is a result, not a crash
            rows.append(Row(status="failed", note=f"{type(error).__name__}: {error}"[:200],
                            **fields))
        _progress(rows[-1])
      attach_roofline(rows[first:], lightning_roofline(b, t, h, d, dtype, backward=backward))
  return rows


def lightning_roofline(batch: int, seq_len: int, heads: int, head_dim: int, dtype: str, *,
                       backward: bool) -> dict | None:
  """The roofline column from the shared scalar-decay stack's model
  (``pallas_kernels.ssd.cost.lightning_cost``), None while it does not exist."""
  cost = load_cost("ssd.cost", "lightning_cost")
  return None if cost is None else roofline(lambda backend: cost(
      batch=batch, seq_len=seq_len, num_heads=heads, d_k=head_dim, d_v=head_dim, dtype=dtype,
      backend=backend, backward=backward))
