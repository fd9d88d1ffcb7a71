"""Roofline cost of one ``titans_memory`` call (linear memory) from the kernels' block plan.

:func:`titans_cost` counts what the Pallas kernels of ``tpu.py`` / ``gpu.py`` move and
compute for one call of the linear memory (depth 1): q, k [batch, seq, heads, d_k], v
[batch, seq, heads, d_v] (input dtype), the three gates [batch, seq, heads] float32, no
initial state; o like v. ``seq`` is taken as a whole number of chunks (the benchmark's case).

Plan (GUIDE §5 "bytes moved from the block plan"):

* ``ops.py`` moves q, k, v to heads-major [batch, heads, seq, d] (an XLA transpose: read +
  write each) and stacks the three gates as float32 rows [batch, heads, chunks, 3, chunk];
  o comes back through the inverse transpose.
* TPU: grid (batch, heads, d_v tiles, groups of ``stride`` chunks). q, k and the gates are
  read once per d_v tile, v once; the forward writes o, the final (M, S) and the (M, S)
  entering every group (float32 [batch, heads, groups, d_k, d_v] each). The backward reads
  the same inputs in reverse plus the group states and dO (transposed), recomputes the
  chunk states in VMEM, and writes dq, dk (per d_v tile: float32 partials when there are
  several tiles, summed by XLA), dv and the gate cotangents (float32 partials per tile).
  The layout parts are approximate (the gate rows are counted once read, once written).
* GPU: grid (d_v tiles, batch, heads), d_k padded to a power of two >= 16 and d_v to whole
  tiles of ``block_v``; the forward saves (M, S) entering every chunk (float32
  [batch, heads, chunks, d_k, d_v] each), the backward reads them back; dq, dk partials are
  float32 per tile even with one tile. Otherwise as TPU.

FLOPs (per batch, head and token, chunk C): 2 C (d_k + d_v) for the intra-chunk Q K^T and
the weights times U (the full C x C blocks the kernels compute), and 10 d_k d_v for Q M0,
Q S0, K M0 and the two state updates; the backward counts twice the forward (state
recomputation plus the transposed products). The TPU's bfloat16 hi/lo split of float32
state operands (two MXU passes) is not counted.
"""

from __future__ import annotations

import math

from pallas_kernels._common.roofline import Cost, itemsize

_BACKENDS = ("tpu", "gpu")
DEFAULT_CHUNK = 64  # ``titans_memory``'s default chunk_size


def titans_plan(*, backend: str, batch: int, heads: int, seq_len: int, d_k: int, d_v: int,
                chunk: int = DEFAULT_CHUNK) -> dict:
  """The block plan: dk, dv (as the kernels hold them), block_v, tiles, saved states
  (``saved``: how many (M, S) pairs per (batch, head) the forward writes)."""
  # pylint: disable=import-outside-toplevel
  if backend not in _BACKENDS:
    raise ValueError(f"titans_plan: backend must be one of {_BACKENDS}, got {backend!r}.")
  chunks = math.ceil(seq_len / chunk)
  if backend == "tpu":
    from pallas_kernels.titans_memory import tpu
    bv = tpu.block_v(d_k, d_v)
    stride = tpu.group_stride(chunks, chunk, d_k, bv)
    return dict(dk=d_k, dv=d_v, block_v=bv, tiles=d_v // bv, saved=math.ceil(chunks / stride))
  from pallas_kernels.titans_memory import gpu
  dk = gpu.padded_dim(d_k)
  bv = gpu.block_v(d_v, batch * heads)
  dv = -(-d_v // bv) * bv
  return dict(dk=dk, dv=dv, block_v=bv, tiles=dv // bv, saved=chunks)


def titans_cost(*, batch: int, seq_len: int, heads: int, d_k: int, d_v: int, dtype,
                backend: str, chunk: int = DEFAULT_CHUNK, backward: bool = False) -> Cost:
  """FLOPs and HBM bytes of one linear-memory call (forward, or forward + backward).

  Args:
    batch, seq_len, heads, d_k, d_v: the sizes (positive ints).
    dtype: the dtype of q, k, v (e.g. "bfloat16").
    backend: "tpu" or "gpu": whose block plan to count.
    chunk: tokens per chunk (the op's ``chunk_size``; default 64).
    backward: count the forward (which saves the states) and the backward.

  Returns:
    A :class:`Cost`; ``parts``: "layout" (the XLA transposes and gate rows), "qkv" (kernel
    reads), "out" (o written), "states" (saved and final states), and with ``backward``
    "bwd.layout", "bwd.in", "bwd.states", "bwd.out".
  """
  for name, value in (("batch", batch), ("seq_len", seq_len), ("heads", heads),
                      ("d_k", d_k), ("d_v", d_v), ("chunk", chunk)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"titans_cost: {name} must be a positive int, got {value!r}.")
  plan = titans_plan(backend=backend, batch=batch, heads=heads, seq_len=seq_len, d_k=d_k,
                     d_v=d_v, chunk=chunk)
  size = itemsize(dtype)
  bh, t = batch * heads, seq_len
  dk, dv, tiles = plan["dk"], plan["dv"], plan["tiles"]
  qk, vv = bh * t * dk * size, bh * t * dv * size  # one of q / k, and v, as the kernel reads
  user_qk, user_v = bh * t * d_k * size, bh * t * d_v * size  # as the caller passes them
  gates = 3 * bh * t * 4
  state = bh * dk * dv * 4
  layout = 2 * (2 * user_qk + user_v) + 2 * gates  # transposes; gates read, rows written
  parts = [("layout", float(layout)),
           ("qkv", float(tiles * (2 * qk + gates) + vv)),
           ("out", float(vv + 2 * user_v)),  # o written, then transposed back (read + write)
           ("states", float(2 * state * plan["saved"] + 2 * state))]
  per_token = 2.0 * chunk * (dk + dv) + 10.0 * dk * dv
  flops = bh * t * per_token
  if backward:
    # dq, dk partials: float32 on GPU, and on TPU when several tiles are summed.
    partial = 4 if tiles > 1 or backend == "gpu" else size
    parts += [
        ("bwd.layout", float(layout + 2 * user_v)),  # inputs and dO moved again
        ("bwd.in", float(tiles * (2 * qk + gates) + 2 * vv)),  # q, k, gates per tile; v, dO
        ("bwd.states", float(2 * state * plan["saved"] + 2 * state)),  # read; d(M0, S0)
        # dq, dk, gate partials per tile (read back by the XLA sum when several), dv, and
        # the transposes of dq, dk, dv back to the caller's layout.
        ("bwd.out", float((2 if tiles > 1 else 1) * tiles * (2 * bh * t * dk * partial + gates)
                          + vv + 2 * (2 * user_qk + user_v))),
    ]
    flops *= 3
  return Cost(flops, sum(v for _, v in parts), tuple(parts))
