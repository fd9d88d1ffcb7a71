"""Roofline cost of one ``decode_attention`` call from the kernels' block plan (GUIDE §5).

:func:`decode_cost` counts what the Pallas flash-decoding kernels of ``tpu.py`` / ``gpu.py``
move and compute for one call with every row's cache full (lengths = cache_len), no window
and no sinks: the benchmark's case. Layouts as ``ops.py``: query [batch, q_len, heads,
head_dim], caches [batch, cache_len, kv_heads, head_dim], output like the query.

HBM bytes (``Cost.parts``):

* ``kv``: K and V blocks. TPU: each (row, kv head) visits ``ceil(cache_len / block_k)``
  blocks of ``block_k`` keys (the edge block is copied whole), nothing repeated per query
  head (the group's query heads are rows of one matmul). GPU: every load is masked to the
  row's length, so exactly ``cache_len`` keys per (row, kv head).
* ``q``: the query, transposed by ``ops.py`` to [batch, kv_heads, rows, head_dim] (XLA
  reads it and writes it: 2x its bytes), then read once per (row, kv head).
* ``partials``: each split writes its normalised output and log-sum-exp in float32
  ([batch, kv_heads, splits, rows, head_dim] and [..., 1]), which the XLA merge reads back.
* ``out``: the merged output written in the query dtype, transposed back (read + write).

FLOPs: Q K^T and P V on every visited key: 4 * batch * heads * q_len * keys * head_dim (keys
= the visited blocks' keys on TPU, cache_len on GPU). Softmax exponentials are not counted.
"""

from __future__ import annotations

import math

from pallas_kernels._common.roofline import Cost, itemsize

_BACKENDS = ("tpu", "gpu")


def decode_cost(*, batch: int, cache_len: int, num_heads: int, num_kv_heads: int,
                head_dim: int, dtype, backend: str, q_len: int = 1, block_k: int | None = None,
                num_splits: int | None = None) -> Cost:
  """FLOPs and HBM bytes of one decode call (forward only; decoding has no backward).

  Args:
    batch, cache_len, num_heads, num_kv_heads, head_dim, q_len: the sizes (ints >= 1;
      num_heads a multiple of num_kv_heads).
    dtype: the query / cache dtype (e.g. "bfloat16").
    backend: "tpu" or "gpu": whose block plan to count.
    block_k, num_splits: as ``decode_attention``'s arguments; None takes the backend's
      defaults (``tpu.SPEC`` / ``gpu.SPEC``).

  Returns:
    A :class:`Cost` with parts "kv", "q", "partials", "out".
  """
  if backend not in _BACKENDS:
    raise ValueError(f"decode_cost: backend must be one of {_BACKENDS}, got {backend!r}.")
  for name, value in (("batch", batch), ("cache_len", cache_len), ("num_heads", num_heads),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("q_len", q_len)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"decode_cost: {name} must be a positive int, got {value!r}.")
  if num_heads % num_kv_heads:
    raise ValueError(f"decode_cost: num_heads ({num_heads}) must be a multiple of "
                     f"num_kv_heads ({num_kv_heads}).")
  size = itemsize(dtype)
  spec = _spec(backend)
  if block_k is None:
    block_k = spec.default_block_k(cache_len, num_kv_heads, head_dim, size)
  block_k = spec.fit_block_k(block_k, cache_len)
  blocks = math.ceil(cache_len / block_k)
  if num_splits is None:
    num_splits = spec.default_num_splits(batch, num_kv_heads, blocks)
  splits = max(1, min(num_splits, blocks))
  keys = blocks * block_k if backend == "tpu" else cache_len
  # The kernels work on query rows padded to the backend's tile (GPU: a power of two >= 16;
  # TPU: a multiple of 8) and on the padded head_dim: count what they copy and compute.
  rows = spec.padded_rows(q_len * (num_heads // num_kv_heads))
  dp = spec.padded_head_dim(head_dim)

  kv = 2 * batch * num_kv_heads * keys * head_dim * size
  q_bytes = batch * q_len * num_heads * head_dim * size
  q_tile = batch * num_kv_heads * rows * dp * size
  partial = batch * num_kv_heads * splits * rows * (dp + 1) * 4
  parts = (("kv", float(kv)), ("q", 2.0 * q_bytes + q_tile), ("partials", 2.0 * partial),
           ("out", 3.0 * q_bytes))
  flops = 4.0 * batch * num_kv_heads * rows * keys * dp
  return Cost(flops, sum(b for _, b in parts), parts)


def _spec(backend: str):
  # pylint: disable=import-outside-toplevel
  if backend == "tpu":
    from pallas_kernels.decode_attention import tpu
    return tpu.SPEC
  from pallas_kernels.decode_attention import gpu
  return gpu.SPEC
