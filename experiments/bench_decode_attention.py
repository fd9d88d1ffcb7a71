"""Kernel benchmark entry for ``decode_attention`` (flash-decoding), for ``benchmark_kernels``.

``bench_decode_attention(settings)`` returns :class:`benchmark_kernels.Row` s for one decode
step (q_len 1) over a full KV cache of ``size`` entries: our op (default dispatch, and the
blockwise XLA path on accelerators), the naive reference, and as peers
``jax.nn.dot_product_attention`` on the same cache (its XLA implementation, with the
lengths as ``key_value_seq_lengths``; on GPU also cuDNN) and, on GPU, the Pallas
``decode_attention.gqa`` kernel that ships with jax, when importable.

Sizes (cache lengths): CPU 1K and 4K (quick: 1K), float32, batch 1, 8 heads over 2 kv heads,
head_dim 64; accelerators 1K, 4K, 16K, 64K (quick: 4K), bfloat16, batch 1 and 8, 32 heads
over 8 kv heads (GQA), head_dim 128. Decoding is inference: only the "fwd" mode has rows.

Decoding is bound by memory: each row's note carries the bytes the step must read (K and V
of the valid cache, once: nothing is repeated per query head), the bandwidth achieved, and
the time that traffic takes at the HBM bandwidth of TPU v5e, v6e and an H100 (the roofline
bound of the step). FLOPs: 4 * batch * heads * cache_len * head_dim (Q K^T and P V).
"""

from __future__ import annotations

import importlib
import sys

import jax
import jax.numpy as jnp

from experiments import benchmarking
from experiments.benchmark_kernels import (OURS, PEER, REFERENCE, Row, attach_roofline,
                                           load_cost, roofline, row_from_measurement)
from pallas_kernels import decode_attention

KERNEL = "decode_attention"
# HBM bandwidth, bytes/s, for the roofline bound in each row's note.
HBM_BANDWIDTH = {"v5e": 819e9, "v6e": 1640e9, "H100": 3350e9}


def _progress(row: Row) -> None:
  time_text = "-" if row.time_ms is None else f"{row.time_ms:.2f} ms"
  print(f"  {row.kernel} T={row.size} {row.mode} {row.implementation}: {row.status} "
        f"{time_text} {row.note}".rstrip(), file=sys.stderr, flush=True)


def _defaults(platform: str, quick: bool) -> dict:
  if platform == "cpu":
    sizes = (1024,) if quick else (1024, 4096)
    return dict(sizes=sizes, dtype="float32", batches=(1,), heads=8, kv_heads=2,
                head_dim=64)
  sizes = (4096,) if quick else (1024, 4096, 16384, 65536)
  return dict(sizes=sizes, dtype="bfloat16", batches=(1,) if quick else (1, 8), heads=32,
              kv_heads=8, head_dim=128)


def decode_bytes(batch: int, cache_len: int, kv_heads: int, head_dim: int,
                 itemsize: int) -> int:
  """Bytes one decode step must read: K and V of the whole (valid) cache, once."""
  return 2 * batch * cache_len * kv_heads * head_dim * itemsize


def decode_flops(batch: int, heads: int, cache_len: int, head_dim: int) -> float:
  """Q K^T and P V for one query per head: 4 * B * H * T * D."""
  return 4.0 * batch * heads * cache_len * head_dim


def roofline_note(num_bytes: int, seconds: float | None) -> str:
  """The bytes read, the bandwidth achieved and the HBM-bound time on each device."""
  bounds = " ".join(f"{name} {num_bytes / bw * 1e6:,.1f}us" for name, bw in HBM_BANDWIDTH.items())
  achieved = "" if not seconds else f", {num_bytes / seconds / 1e9:,.1f} GB/s"
  return f"reads {num_bytes / benchmarking.MIB:,.1f} MiB{achieved}; HBM bound: {bounds}"


def _candidates(platform: str, scale: float):
  """(name, role, fn(q, k, v, lengths) or None, note)."""
  ours = lambda impl: lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, scale=scale, implementation=impl)
  default = "xla" if platform == "cpu" else "pallas"
  out = [(f"lclm (default={default})", OURS, ours(None), "")]
  if platform != "cpu":
    out.append(("lclm xla", OURS, ours("xla"), ""))
  out.append(("reference", REFERENCE, ours("reference"), ""))
  jax_nn = lambda impl: lambda q, k, v, lengths: jax.nn.dot_product_attention(
      q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation=impl)
  out.append(("jax.nn xla", PEER, jax_nn("xla"), ""))
  if platform == "gpu":
    out.append(("jax.nn cudnn", PEER, jax_nn("cudnn"), ""))
    try:
      module = importlib.import_module("jax.experimental.pallas.ops.gpu.decode_attention")
      gqa = lambda q, k, v, lengths: module.gqa(
          q[:, 0], k, v, kv_seq_len=lengths, sm_scale=scale)[:, None]
      out.append(("pallas.ops.gpu decode gqa", PEER, gqa, ""))
    except Exception as error:  # absent or broken in this jax: report, never fail
      out.append(("pallas.ops.gpu decode gqa", PEER, None,
                  f"not importable: {type(error).__name__}: {error}"[:200]))
  return out


def bench_decode_attention(settings) -> list[Row]:
  """One decode step (q_len 1, full cache) at each cache length and batch."""
  if "fwd" not in settings.modes:
    return []
  platform = jax.default_backend()
  defaults = _defaults(platform, settings.quick)
  sizes = settings.sizes or defaults["sizes"]
  dtype = settings.dtype or defaults["dtype"]
  h, hk, d = defaults["heads"], defaults["kv_heads"], defaults["head_dim"]
  candidates = _candidates(platform, d ** -0.5)
  rows = []
  for b in defaults["batches"]:
    config = f"B{b} H{h} KV{hk} D{d} q_len 1"
    for t in sizes:
      keys = jax.random.split(jax.random.key(t + b), 3)
      q = jax.random.normal(keys[0], (b, 1, h, d), dtype)
      k = jax.random.normal(keys[1], (b, t, hk, d), dtype)
      v = jax.random.normal(keys[2], (b, t, hk, d), dtype)
      lengths = jnp.full((b,), t, jnp.int32)
      num_bytes = decode_bytes(b, t, hk, d, jnp.dtype(dtype).itemsize)
      flops = decode_flops(b, h, t, d)
      first = len(rows)
      for name, role, fn, note in candidates:
        fields = dict(kernel=KERNEL, config=config, size=t, mode="fwd", dtype=dtype,
                      implementation=name, role=role)
        if fn is None:
          rows.append(Row(status="failed", note=note, **fields))
          _progress(rows[-1])
          continue
        measurement = benchmarking.measure(fn, q, k, v, lengths,
                                           budget_bytes=settings.budget_bytes,
                                           warmup=settings.warmup, repeats=settings.repeats)
        row = row_from_measurement(measurement, flops=flops, **fields)
        roofline = roofline_note(num_bytes, measurement.seconds)
        row.note = f"{row.note}; {roofline}" if row.note else roofline
        rows.append(row)
        _progress(rows[-1])
      attach_roofline(rows[first:], decode_roofline(b, t, h, hk, d, dtype))
  return rows


def decode_roofline(batch: int, cache_len: int, heads: int, kv_heads: int, head_dim: int,
                    dtype: str) -> dict | None:
  """The roofline column from ``pallas_kernels.decode_attention.cost`` (default blocks)."""
  cost = load_cost("decode_attention.cost", "decode_cost")
  return None if cost is None else roofline(lambda backend: cost(
      batch=batch, cache_len=cache_len, num_heads=heads, num_kv_heads=kv_heads,
      head_dim=head_dim, dtype=dtype, backend=backend))
