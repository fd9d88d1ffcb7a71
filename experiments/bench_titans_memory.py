"""Kernel benchmark entry for ``titans_memory`` (the linear memory; GUIDE §5).

``bench_titans_memory(settings)`` returns :class:`benchmark_kernels.Row` s for: our op
(default dispatch, and the chunked XLA path on accelerators), the token-by-token reference,
and as peers the other chunked recurrent cores at the same token count, heads and head dims:
``lightning_attention`` (linear attention with a per-head decay) and ``ssd`` (Mamba-2, head
dim and d_state the memory's d_v and d_k, one group), both at their default dispatch.

Sizes: CPU 1K and 4K tokens (quick: 1K), float32, B1 H8 D64; accelerators 4K ... 32K tokens
(quick: 4K), bfloat16, B1 H16 D128. Chunk 64 (the op's default).

FLOPs are nominal, the same for every implementation of the op: per (batch, head) and
token, at chunk 64, 2 * 64 * (d_k + d_v) (the intra-chunk Q K^T and weights times errors)
+ 10 * d_k * d_v (Q M, Q S, K M and the two state updates); x3 with the backward. The peer
rows count their own nominal FLOPs (``lightning_flops``, ``ssd_flops``).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarking
from experiments.bench_lightning_attention import lightning_flops
from experiments.bench_ssd import ssd_flops
from experiments.benchmark_kernels import (OURS, PEER, REFERENCE, Row, attach_roofline,
                                           load_cost, roofline, row_from_measurement)
from pallas_kernels.lightning_attention import lightning_attention
from pallas_kernels.ssd import ssd
from pallas_kernels.titans_memory import titans_memory

KERNEL = "titans_memory"
NOMINAL_CHUNK = 64


def titans_flops(batch: int, heads: int, seq_len: int, d_k: int, d_v: int, *,
                 backward: bool) -> float:
  """Nominal FLOPs of the chunked linear memory (see the module docstring)."""
  per_token = 2.0 * NOMINAL_CHUNK * (d_k + d_v) + 10.0 * d_k * d_v
  flops = batch * heads * seq_len * per_token
  return flops * 3 if backward else flops


def _defaults(platform: str, quick: bool) -> dict:
  if platform == "cpu":
    sizes = (1024,) if quick else (1024, 4096)
    return dict(sizes=sizes, dtype="float32", batch=1, heads=8, head_dim=64)
  sizes = (4096,) if quick else (4096, 8192, 16384, 32768)
  return dict(sizes=sizes, dtype="bfloat16", batch=1, heads=16, head_dim=128)


def _titans_inputs(key, b, t, h, d, dtype):
  ks = jax.random.split(key, 6)
  normal = lambda k: (jax.random.normal(k, (b, t, h, d), jnp.float32) / np.sqrt(d)).astype(dtype)
  unit = lambda k, lo, hi: jax.random.uniform(k, (b, t, h), minval=lo, maxval=hi)
  return (normal(ks[0]), normal(ks[1]), normal(ks[2]), unit(ks[3], 0.01, 0.1),
          unit(ks[4], 0.8, 0.99), unit(ks[5], 0.0, 0.05))


def _ssd_inputs(key, b, t, h, d, dtype):
  """x [b, t, h, d_v], dt, A, B / C [b, t, 1, d_k]: SSD at the memory's shapes."""
  ks = jax.random.split(key, 5)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  a = -jax.random.uniform(ks[2], (h,), minval=1.0, maxval=16.0)
  return (normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, h), jnp.float32), a,
          normal(ks[3], (b, t, 1, d)), normal(ks[4], (b, t, 1, d)))


def _candidates(platform: str, heads: int):
  """(name, role, inputs kind, forward)."""
  ours = lambda impl: lambda q, k, v, lr, mom, dec: titans_memory(
      q, k, v, lr, mom, dec, implementation=impl)
  default = "xla" if platform == "cpu" else "pallas"
  out = [(f"lclm titans_memory (default={default})", OURS, "titans", ours(None))]
  if platform != "cpu":
    out.append(("lclm titans_memory xla", OURS, "titans", ours("xla")))
  out.append(("reference", REFERENCE, "titans", ours("reference")))
  decay = np.exp(-(2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)))
  out.append(("lightning_attention (peer)", PEER, "qkv",
              lambda q, k, v: lightning_attention(q, k, v, decay=decay)))
  out.append(("ssd (peer)", PEER, "ssd",
              lambda x, dt, a, b, c: ssd(x, dt, a, b, c, dt_softplus=True)))
  return out


def bench_titans_memory(settings) -> list[Row]:
  """The linear Titans memory, q/k/v [B, T, H, D], gates [B, T, H], chunk 64."""
  platform = jax.default_backend()
  defaults = _defaults(platform, settings.quick)
  sizes = settings.sizes or defaults["sizes"]
  dtype = settings.dtype or defaults["dtype"]
  b, h, d = defaults["batch"], defaults["heads"], defaults["head_dim"]
  config = f"B{b} H{h} Dk{d} Dv{d} chunk {NOMINAL_CHUNK}; peers at the same sizes"
  rows = []
  for t in sizes:
    key = jax.random.key(t)
    titans_args = _titans_inputs(key, b, t, h, d, dtype)
    inputs = dict(titans=titans_args, qkv=titans_args[:3],
                  ssd=_ssd_inputs(jax.random.fold_in(key, 1), b, t, h, d, dtype))
    d_out = jax.random.normal(jax.random.fold_in(key, 2), (b, t, h, d), dtype)
    for mode in settings.modes:
      backward = mode == "fwd_bwd"
      flops = dict(titans=titans_flops(b, h, t, d, d, backward=backward),
                   qkv=lightning_flops(b, h, t, d, d, backward=backward),
                   ssd=ssd_flops(b, t, h, d, d, backward=backward))
      first = len(rows)
      for name, role, kind, forward in _candidates(platform, h):
        fields = dict(kernel=KERNEL, config=config, size=t, mode=mode, dtype=dtype,
                      implementation=name, role=role)
        fn, args = forward, inputs[kind]
        if backward:
          fn, args = benchmarking.forward_and_backward(forward), args + (d_out,)
        measurement = benchmarking.measure(fn, *args, budget_bytes=settings.budget_bytes,
                                           warmup=settings.warmup, repeats=settings.repeats)
        rows.append(row_from_measurement(measurement, flops=flops[kind], **fields))
        row = rows[-1]
        time_text = "-" if row.time_ms is None else f"{row.time_ms:.2f} ms"
        print(f"  {KERNEL} T={t} {mode} {name}: {row.status} {time_text} {row.note}".rstrip(),
              file=sys.stderr, flush=True)
      attach_roofline(rows[first:], titans_roofline(b, t, h, d, dtype, backward=backward))
  return rows


def titans_roofline(batch: int, seq_len: int, heads: int, head_dim: int, dtype: str, *,
                    backward: bool) -> dict | None:
  """The roofline column from ``pallas_kernels.titans_memory.cost`` (d_k = d_v, chunk 64)."""
  cost = load_cost("titans_memory.cost", "titans_cost")
  return None if cost is None else roofline(lambda backend: cost(
      batch=batch, seq_len=seq_len, heads=heads, d_k=head_dim, d_v=head_dim, dtype=dtype,
      backend=backend, chunk=NOMINAL_CHUNK, backward=backward))
