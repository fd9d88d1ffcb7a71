"""Kernel benchmark of ``selective_scan`` (Mamba-1's S6 scan), for ``benchmark_kernels``.

``bench_selective_scan(settings)`` returns one :class:`~experiments.benchmark_kernels.Row`
per (size, mode, implementation): ours (the default implementation, plus the XLA path on
accelerators), the token-by-token reference, and as peers flash attention (causal, 16
heads of 128 = the same width as d_inner 2048) at the same token count, the mixer a Mamba
layer replaces, and on GPU mamba_ssm's CUDA ``selective_scan_fn`` (PyTorch, timed with CUDA
events) when importable ("not importable: ..." otherwise). The driver adds the ratios.

FLOPs: the forward counts 7 per (token, channel, state) (dt*A, exp, decay*h, dt*u*B, +,
C*h, the sum over states) plus 6 per (token, channel) (bias, softplus, D*u, gate); the
backward adds 19 per (token, channel, state) (the recomputed forward, then s, dB, dx, the
decay gradient, dA, ddt, s*decay) and 10 per (token, channel).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarking
from experiments.benchmark_kernels import (OURS, PEER, REFERENCE, Row, attach_roofline,
                                           load_cost, roofline, row_from_measurement)
from pallas_kernels import flash_attention
from pallas_kernels.selective_scan import selective_scan

KERNEL = "selective_scan"


def _defaults(platform: str, quick: bool) -> dict:
  if platform == "cpu":
    sizes = (1024,) if quick else (1024, 4096)
    return dict(sizes=sizes, dtype="float32", batch=1, d_inner=1536, d_state=16,
                attention_heads=12, head_dim=128)
  sizes = (4096,) if quick else (4096, 8192, 16384, 32768, 65536)
  return dict(sizes=sizes, dtype="bfloat16", batch=1, d_inner=2048, d_state=16,
              attention_heads=16, head_dim=128)


def scan_flops(batch: int, seq: int, d_inner: int, d_state: int, *, backward: bool) -> float:
  """The FLOP count of the module docstring."""
  elements, channels = batch * seq * d_inner * d_state, batch * seq * d_inner
  flops = 7 * elements + 6 * channels
  if backward:
    flops += 19 * elements + 10 * channels
  return float(flops)


@dataclasses.dataclass(frozen=True)
class _Candidate:
  name: str
  role: str
  forward: Callable  # (*inputs) -> output
  attention: bool = False  # takes (q, k, v) instead of the scan's inputs


def _candidates(platform: str, scale: float):
  ours = lambda impl: lambda u, delta, A, B, C, D, z, bias: selective_scan(
      u, delta, A, B, C, D, z, bias, delta_softplus=True, implementation=impl)
  default = "xla" if platform == "cpu" else "pallas"
  candidates = [_Candidate(f"lclm (default={default})", OURS, ours(None))]
  if platform != "cpu":
    candidates.append(_Candidate("lclm xla", OURS, ours("xla")))
  candidates.append(_Candidate("reference", REFERENCE, ours("reference")))
  candidates.append(_Candidate(
      "flash_attention causal (peer)", PEER,
      lambda q, k, v: flash_attention(q, k, v, scale=scale, is_causal=True), attention=True))
  return candidates


def _mamba_peer():
  """(forward on our [batch, seq, channels] inputs, "") with mamba_ssm's selective_scan_fn,
  or (None, why it is unavailable)."""
  try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
  except Exception as error:  # Absent or broken: report, do not fail.
    return None, f"not importable: {type(error).__name__}: {error}"[:200]

  def forward(u, delta, A, B, C, D, z, bias):
    # mamba_ssm's layout: u, delta, z [batch, channels, seq]; B, C [batch, d_state, seq].
    t = lambda x: x.transpose(1, 2).contiguous()
    y = selective_scan_fn(t(u), t(delta), A, t(B), t(C), D=D, z=t(z), delta_bias=bias,
                          delta_softplus=True)
    return y.transpose(1, 2)
  return forward, ""


def _scan_inputs(key, b, t, d, n, dtype):
  """Mamba-like inputs: S4D-real A, dt bias from the log-uniform initial dt."""
  ks = jax.random.split(key, 7)
  x = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  A = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n))
  dt = jnp.exp(jax.random.uniform(ks[5], (d,), minval=np.log(1e-3), maxval=np.log(0.1)))
  bias = dt + jnp.log(-jnp.expm1(-dt))
  return (x(ks[0], (b, t, d)), x(ks[1], (b, t, d)), A, x(ks[2], (b, t, n)),
          x(ks[3], (b, t, n)), jnp.ones((d,), jnp.float32), x(ks[4], (b, t, d)), bias)


def bench_selective_scan(settings) -> list[Row]:
  """selective_scan with softplus(delta + bias), z gating and D, channels last."""
  platform = jax.default_backend()
  defaults = _defaults(platform, settings.quick)
  sizes = settings.sizes or defaults["sizes"]
  dtype = settings.dtype or defaults["dtype"]
  b, d, n = defaults["batch"], defaults["d_inner"], defaults["d_state"]
  heads, head_dim = defaults["attention_heads"], defaults["head_dim"]
  config = f"B{b} D{d} N{n} softplus z D; peer H{heads} Dh{head_dim} causal"
  candidates = _candidates(platform, head_dim ** -0.5)
  mamba, mamba_note = _mamba_peer() if platform == "gpu" else (None, "")
  rows = []
  for t in sizes:
    key = jax.random.key(t)
    scan_inputs = _scan_inputs(key, b, t, d, n, dtype)
    keys = jax.random.split(jax.random.fold_in(key, 1), 5)
    qkv = tuple(jax.random.normal(k, (b, t, heads, head_dim), dtype) for k in keys[:3])
    d_y = jax.random.normal(keys[3], (b, t, d), dtype)
    d_out = jax.random.normal(keys[4], (b, t, heads, head_dim), dtype)
    for mode in settings.modes:
      backward = mode == "fwd_bwd"
      first = len(rows)
      for cand in candidates:
        if cand.attention:
          flops = benchmarking.attention_flops(b, heads, t, t, head_dim, causal=True,
                                               backward=backward)
          inputs, cotangent = qkv, d_out
        else:
          flops = scan_flops(b, t, d, n, backward=backward)
          inputs, cotangent = scan_inputs, d_y
        fn, args = cand.forward, inputs
        if backward:
          fn, args = benchmarking.forward_and_backward(cand.forward), inputs + (cotangent,)
        measurement = benchmarking.measure(
            fn, *args, budget_bytes=settings.budget_bytes, warmup=settings.warmup,
            repeats=settings.repeats)
        rows.append(row_from_measurement(
            measurement, flops=flops, kernel=KERNEL, config=config, size=t, mode=mode,
            dtype=dtype, implementation=cand.name, role=cand.role))
        row = rows[-1]
        time_text = "-" if row.time_ms is None else f"{row.time_ms:.2f} ms"
        print(f"  {KERNEL} T={t} {mode} {cand.name}: {row.status} {time_text} {row.note}"
              .rstrip(), file=sys.stderr, flush=True)
      if platform == "gpu":
        fields = dict(kernel=KERNEL, config=config, size=t, mode=mode, dtype=dtype,
                      implementation="mamba_ssm selective_scan_fn (peer)", role=PEER)
        if mamba is None:
          rows.append(Row(status="failed", note=mamba_note, **fields))
        else:
          measurement = benchmarking.measure_torch(
              mamba, scan_inputs, d_y, backward=backward, warmup=settings.warmup,
              repeats=settings.repeats)
          rows.append(row_from_measurement(
              measurement, flops=scan_flops(b, t, d, n, backward=backward), **fields))
      attach_roofline(rows[first:], scan_roofline(b, t, d, n, dtype, backward=backward))
  return rows


def scan_roofline(batch: int, seq_len: int, d_inner: int, d_state: int, dtype: str, *,
                  backward: bool) -> dict | None:
  """The roofline column from ``pallas_kernels.selective_scan.cost`` (z gate, one group,
  default blocks)."""
  cost = load_cost("selective_scan.cost", "scan_cost")
  return None if cost is None else roofline(lambda backend: cost(
      batch=batch, seq_len=seq_len, d_inner=d_inner, d_state=d_state, dtype=dtype,
      backend=backend, has_z=True, backward=backward))
