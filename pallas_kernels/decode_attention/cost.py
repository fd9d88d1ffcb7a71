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

Block retrieval (``selected_blocks=k``, with ``local_window_size`` / ``num_sink_tokens`` as
the op's): each (row, kv head) visits its sink and window blocks plus k selected blocks
(assumed distinct and outside the sinks and the window, as ``retrieval.select_blocks``
picks them), at most every block: ``kv`` counts those blocks' bytes only (GPU: the edge
block of the cache is partial when the window reaches it). The TPU kernel's blocks hold
every kv head (``tpu.py``), so a row copies the union of its kv heads' lists: counted at
its worst, disjoint lists (base + num_kv_heads x k blocks, at most every block); FLOPs count
each kv head's own visits. The part ``visits`` counts
the visit lists (int32 blocks and flags, written by XLA and read by the kernel, and the
[batch, kv_heads, k] ``block_indices`` read). The window / sinks without ``selected_blocks``
shrink ``kv`` the same way (plain windowed decoding).
"""

from __future__ import annotations

import math

from pallas_kernels._common.roofline import Cost, itemsize
from pallas_kernels.decode_attention.xla import BlockPlan

_BACKENDS = ("tpu", "gpu")


def decode_cost(*, batch: int, cache_len: int, num_heads: int, num_kv_heads: int,
                head_dim: int, dtype, backend: str, q_len: int = 1, block_k: int | None = None,
                num_splits: int | None = None, selected_blocks: int | None = None,
                local_window_size: int | None = None, num_sink_tokens: int = 0) -> Cost:
  """FLOPs and HBM bytes of one decode call (forward only; decoding has no backward).

  Args:
    batch, cache_len, num_heads, num_kv_heads, head_dim, q_len: the sizes (ints >= 1;
      num_heads a multiple of num_kv_heads).
    dtype: the query / cache dtype (e.g. "bfloat16").
    backend: "tpu" or "gpu": whose block plan to count.
    block_k, num_splits: as ``decode_attention``'s arguments; None takes the backend's
      defaults (``tpu.SPEC`` / ``gpu.SPEC``).
    selected_blocks: block retrieval: the selected blocks per kv head (``block_indices``'
      max_selected), or None (no retrieval).
    local_window_size: the window's left reach (an int) or None; num_sink_tokens: sinks.

  Returns:
    A :class:`Cost` with parts "kv", "q", "partials", "out" (and "visits" with
    ``selected_blocks``).
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
  if selected_blocks is not None and (not isinstance(selected_blocks, int)
                                      or selected_blocks < 0):
    raise ValueError(f"decode_cost: selected_blocks must be a non-negative int or None, got "
                     f"{selected_blocks!r}.")
  if local_window_size is not None and (not isinstance(local_window_size, int)
                                        or local_window_size < 0):
    raise ValueError(f"decode_cost: local_window_size must be a non-negative int (the left "
                     f"reach) or None, got {local_window_size!r}.")
  size = itemsize(dtype)
  spec = _spec(backend)
  if block_k is None:
    block_k = spec.default_block_k(cache_len, num_kv_heads, head_dim, size)
  block_k = spec.fit_block_k(block_k, cache_len)
  blocks = math.ceil(cache_len / block_k)
  retrieval = selected_blocks is not None
  sinks = num_sink_tokens if (local_window_size is not None or retrieval) else 0
  plan = BlockPlan.build(cache_len=cache_len, q_len=q_len, block_k=block_k,
                         left=local_window_size, num_sinks=sinks, num_splits=1,
                         max_selected=selected_blocks)
  visits = int(plan.row(cache_len)[2])  # base blocks of a full row
  computed = visits
  if selected_blocks is not None:
    per_program = spec.kv_heads_per_program(num_kv_heads, head_dim)
    computed = min(blocks, visits + selected_blocks)
    visits = min(blocks, visits + per_program * selected_blocks)
  if num_splits is None:
    num_splits = spec.default_num_splits(batch, num_kv_heads, visits)
  splits = max(1, min(num_splits, visits))
  keys = visits * block_k
  last_visited = selected_blocks is None or local_window_size is not None or visits == blocks
  if backend == "gpu" and last_visited:  # masked loads: the edge block's padding is not read
    keys -= blocks * block_k - cache_len
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
  if selected_blocks is not None:
    lists = batch * (num_kv_heads // per_program)
    max_visits = min(blocks, max(1, plan.base_visits + per_program * selected_blocks))
    parts += (("visits", float(4 * (batch * num_kv_heads * selected_blocks
                                    + 2 * 2 * lists * max_visits + 2 * lists))),)
  computed_keys = keys if computed == visits else computed * block_k
  flops = 4.0 * batch * num_kv_heads * rows * computed_keys * dp
  return Cost(flops, sum(b for _, b in parts), parts)


def _spec(backend: str):
  # pylint: disable=import-outside-toplevel
  if backend == "tpu":
    from pallas_kernels.decode_attention import tpu
    return tpu.SPEC
  from pallas_kernels.decode_attention import gpu
  return gpu.SPEC
