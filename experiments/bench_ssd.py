"""Kernel benchmark of ``ssd`` (Mamba-2's state-space duality), for ``benchmark_kernels``.

``bench_ssd(settings)`` returns one :class:`~experiments.benchmark_kernels.Row` per (size,
mode, implementation): ours (the default implementation, plus the XLA path on
accelerators), the token-by-token reference, and as peers flash attention (causal, same
heads and head_dim, the mixer an SSD layer replaces) at the same token count and, on GPU,
the Triton SSD kernels of ``mamba_ssm`` (``mamba_chunk_scan_combined``) and
flash-linear-attention (``chunk_simple_gla``: scalar-decay linear attention, SSD without D)
when they are importable; otherwise their rows say "not importable: ...".

Inputs: Mamba-2's head geometry (head_dim 64; d_state 64 on CPU, 128 on accelerators, one
group), dt' = softplus(dt + dt_bias) with Mamba-2's dt_bias initialisation, A = -U(1, 16), D.

FLOPs: a nominal count, the same for every implementation: the chunked algorithm's matmuls
at chunk length 64 with the causal half of the intra-chunk products, per (token, head)
64 * (d_state + head_dim) (C B^T and the masked product with x) + 4 * head_dim * d_state
(the inter-chunk output and the state update); the backward is counted as twice the forward.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarking
from experiments.benchmark_kernels import (OURS, PEER, REFERENCE, Row, attach_roofline,
                                           load_cost, roofline, row_from_measurement)
from pallas_kernels import flash_attention
from pallas_kernels.ssd import ssd

KERNEL = "ssd"
NOMINAL_CHUNK = 64


def _defaults(platform: str, quick: bool) -> dict:
  if platform == "cpu":
    sizes = (1024,) if quick else (1024, 4096)
    return dict(sizes=sizes, dtype="float32", batch=1, heads=8, head_dim=64, d_state=64,
                n_groups=1)
  sizes = (4096,) if quick else (4096, 8192, 16384, 32768, 65536)
  return dict(sizes=sizes, dtype="bfloat16", batch=1, heads=32, head_dim=64, d_state=128,
              n_groups=1)


def ssd_flops(batch: int, seq: int, heads: int, head_dim: int, d_state: int, *,
              backward: bool) -> float:
  """The nominal FLOP count of the module docstring."""
  per_token = NOMINAL_CHUNK * (d_state + head_dim) + 4 * head_dim * d_state
  flops = float(batch * seq * heads * per_token)
  return flops * 3 if backward else flops


@dataclasses.dataclass(frozen=True)
class _Candidate:
  """``forward(*inputs)`` of JAX arrays; ``kind`` "ssd" (the SSD inputs), "attention"
  (q, k, v) or "torch" (a torch-side peer timed by :func:`_measure_torch`); ``error`` set:
  not available here (the rows say why)."""
  name: str
  role: str
  forward: Callable | None
  kind: str = "ssd"
  error: str = ""


def _ours(impl):
  def forward(x, dt, A, B, C, D, dt_bias):
    return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, implementation=impl)
  return forward


def _torch_peers():
  """mamba_ssm's and flash-linear-attention's Triton SSD, or why they are unavailable."""
  peers = []
  try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
  except Exception as error:  # Absent or broken: report, do not fail.
    peers.append(_Candidate("mamba_ssm triton", PEER, None, "torch",
                            f"not importable: {error}"))
  else:
    def mamba_forward(x, dt, A, B, C, D, dt_bias):
      return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=D, dt_bias=dt_bias,
                                       dt_softplus=True)
    peers.append(_Candidate("mamba_ssm triton", PEER, mamba_forward, "torch"))
  try:
    import torch
    from fla.ops.simple_gla import chunk_simple_gla
  except Exception as error:
    peers.append(_Candidate("fla chunk_simple_gla", PEER, None, "torch",
                            f"not importable: {error}"))
  else:
    def fla_forward(x, dt, A, B, C, D, dt_bias):
      # SSD as scalar-decay linear attention: q = C, k = B, v = dt' x, log decay g = dt' A
      # (one group broadcast over the heads; D x added outside).
      dt_eff = torch.nn.functional.softplus(dt.float() + dt_bias)
      heads = x.shape[2]
      q = C.expand(-1, -1, heads, -1) if C.shape[2] == 1 else C
      k = B.expand(-1, -1, heads, -1) if B.shape[2] == 1 else B
      v = x * dt_eff[..., None].to(x.dtype)
      out, _ = chunk_simple_gla(q.contiguous(), k.contiguous(), v, g=dt_eff * A, scale=1.0)
      return out + x * D[:, None].to(x.dtype)
    peers.append(_Candidate("fla chunk_simple_gla", PEER, fla_forward, "torch"))
  return peers


def _candidates(platform: str, scale: float):
  default = "xla" if platform == "cpu" else "pallas"
  candidates = [_Candidate(f"lclm ssd (default={default})", OURS, _ours(None))]
  if platform != "cpu":
    candidates.append(_Candidate("lclm ssd xla", OURS, _ours("xla")))
  candidates.append(_Candidate("reference", REFERENCE, _ours("reference")))
  candidates.append(_Candidate(
      "flash_attention causal (peer)", PEER,
      lambda q, k, v: flash_attention(q, k, v, scale=scale, is_causal=True), "attention"))
  if platform == "gpu":
    candidates += _torch_peers()
  return candidates


def _ssd_inputs(key, b, t, h, p, g, n, dtype):
  ks = jax.random.split(key, 6)
  x = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  dt0 = jnp.exp(jax.random.uniform(ks[4], (h,), minval=np.log(1e-3), maxval=np.log(0.1)))
  dt_bias = dt0 + jnp.log(-jnp.expm1(-dt0))
  A = -jax.random.uniform(ks[5], (h,), minval=1.0, maxval=16.0)
  return (x(ks[0], (b, t, h, p)), jax.random.normal(ks[1], (b, t, h), jnp.float32), A,
          x(ks[2], (b, t, g, n)), x(ks[3], (b, t, g, n)), jnp.ones((h,), jnp.float32), dt_bias)


def _measure_torch(forward, inputs, cotangent, *, backward, warmup, repeats):
  """A Measurement (median seconds by CUDA events, peak bytes) of a torch peer on JAX inputs."""
  return benchmarking.measure_torch(forward, inputs, cotangent, backward=backward,
                                    warmup=warmup, repeats=repeats)


def bench_ssd(settings) -> list[Row]:
  """ssd with softplus(dt + dt_bias) and D, [batch, seq, heads, head_dim] layout."""
  platform = jax.default_backend()
  defaults = _defaults(platform, settings.quick)
  sizes = settings.sizes or defaults["sizes"]
  dtype = settings.dtype or defaults["dtype"]
  b, h, p, n, g = (defaults[k] for k in ("batch", "heads", "head_dim", "d_state", "n_groups"))
  config = f"B{b} H{h} P{p} N{n} G{g} softplus D; peer attention H{h} Dh{p} causal"
  candidates = _candidates(platform, p ** -0.5)
  rows = []
  for t in sizes:
    key = jax.random.key(t)
    ssd_inputs = _ssd_inputs(key, b, t, h, p, g, n, dtype)
    keys = jax.random.split(jax.random.fold_in(key, 1), 4)
    qkv = tuple(jax.random.normal(k, (b, t, h, p), dtype) for k in keys[:3])
    d_out = jax.random.normal(keys[3], (b, t, h, p), dtype)
    for mode in settings.modes:
      backward = mode == "fwd_bwd"
      first = len(rows)
      for cand in candidates:
        fields = dict(kernel=KERNEL, config=config, size=t, mode=mode, dtype=dtype,
                      implementation=cand.name, role=cand.role)
        if cand.kind == "attention":
          flops = benchmarking.attention_flops(b, h, t, t, p, causal=True, backward=backward)
          inputs = qkv
        else:
          flops = ssd_flops(b, t, h, p, n, backward=backward)
          inputs = ssd_inputs
        if cand.forward is None:
          rows.append(Row(status="failed", note=cand.error, **fields))
        elif cand.kind == "torch":
          measurement = _measure_torch(cand.forward, inputs, d_out, backward=backward,
                                       warmup=settings.warmup, repeats=settings.repeats)
          rows.append(row_from_measurement(measurement, flops=flops, **fields))
        else:
          fn, args = cand.forward, inputs
          if backward:
            fn, args = benchmarking.forward_and_backward(cand.forward), inputs + (d_out,)
          measurement = benchmarking.measure(
              fn, *args, budget_bytes=settings.budget_bytes, warmup=settings.warmup,
              repeats=settings.repeats)
          rows.append(row_from_measurement(measurement, flops=flops, **fields))
        row = rows[-1]
        time_text = "-" if row.time_ms is None else f"{row.time_ms:.2f} ms"
        print(f"  {KERNEL} T={t} {mode} {cand.name}: {row.status} {time_text} {row.note}"
              .rstrip(), file=sys.stderr, flush=True)
      attach_roofline(rows[first:], ssd_roofline(b, t, h, p, g, n, dtype, backward=backward))
  return rows


def ssd_roofline(batch: int, seq_len: int, heads: int, head_dim: int, n_groups: int,
                 d_state: int, dtype: str, *, backward: bool) -> dict | None:
  """The roofline column from ``pallas_kernels.ssd.cost`` (its ``ssd_cost``; default
  chunking; ``gated=False``: the rows pass D but no z), None while that model does not
  exist."""
  cost = load_cost("ssd.cost", "ssd_cost")
  return None if cost is None else roofline(lambda backend: cost(
      batch=batch, seq_len=seq_len, num_heads=heads, head_dim=head_dim, num_groups=n_groups,
      d_state=d_state, dtype=dtype, backend=backend, backward=backward, gated=False))
