"""Context parallelism: attention over global arrays whose sequence is split over a mesh axis.

``context_parallel_attention`` takes global arrays in natural token order, applies the
load-balancing permutation, runs a per-device strategy under ``shard_map`` and undoes the
permutation on the output:

* ``"ring"``: :func:`ring_attention` (K/V travel around the ring, O(T/P) memory);
* ``"all_gather"``: gather K/V once, attend with the local queries (one flash call per
  local query chunk, with its static offset picked by ``lax.switch`` over the device);
* ``"ulysses"``: all-to-all from sequence to heads, full attention on a subset of the heads
  on every device, all-to-all back (needs heads and kv heads divisible by the axis size).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from pallas_kernels._common import dispatch, padding
from pallas_kernels.flash_attention import ops as flash_ops
from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.ring_attention import ops as ring_ops

OP = "context_parallel_attention"
STRATEGIES = ("ring", "all_gather", "ulysses")
LOAD_BALANCES = (None, "zigzag", "striped")


def load_balance_permutation(seq_len: int, num_devices: int, load_balance) -> np.ndarray:
  """``perm`` such that ``x[:, perm]`` is the sequence in the device order of ``load_balance``
  (device p then holds ``perm[p * T/P:(p + 1) * T/P]``). The data pipeline can produce this
  order directly; ``np.argsort(perm)`` undoes it."""
  t, p = seq_len, num_devices
  if load_balance is None:
    return np.arange(t)
  if load_balance == "zigzag":
    c = t // (2 * p)
    chunks = np.arange(t).reshape(2 * p, c)
    order = [i for d in range(p) for i in (d, 2 * p - 1 - d)]
    return chunks[order].reshape(-1)
  if load_balance == "striped":
    return np.arange(t).reshape(t // p, p).T.reshape(-1)
  raise ValueError(f"{OP}: load_balance must be one of {LOAD_BALANCES}, got {load_balance!r}.")


def _validate(query, key, value, mesh, axis_name, strategy, load_balance, scale):
  flash_ops._validate(query, key, value, scale, None, op=OP)
  if strategy not in STRATEGIES:
    raise ValueError(f"{OP}: strategy must be one of {STRATEGIES}, got {strategy!r}.")
  if load_balance not in LOAD_BALANCES:
    raise ValueError(f"{OP}: load_balance must be one of {LOAD_BALANCES}, got "
                     f"{load_balance!r}.")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"{OP}: axis_name {axis_name!r} is not an axis of the mesh "
                     f"{dict(mesh.shape)}.")
  p = mesh.shape[axis_name]
  t, h, hk = query.shape[1], query.shape[2], key.shape[2]
  if key.shape[1] != t:
    raise ValueError(f"{OP}: query and key/value must have the same sequence length "
                     f"(self-attention over one sharded sequence), got query "
                     f"{tuple(query.shape)} and key {tuple(key.shape)}.")
  parts = 2 * p if load_balance == "zigzag" else p
  if t % parts:
    what = (f"2 x the size of axis {axis_name!r} ({parts}; zigzag holds two chunks per device)"
            if load_balance == "zigzag" else f"the size of axis {axis_name!r} ({p})")
    raise ValueError(f"{OP}: the sequence length {t} must be divisible by {what}; pad the "
                     "sequence or change the mesh.")
  if strategy == "ulysses" and (h % p or hk % p):
    raise ValueError(f"{OP}: strategy='ulysses' splits heads over axis {axis_name!r} of size "
                     f"{p}: num_heads ({h}) and num_kv_heads ({hk}) must both be divisible by "
                     "it. Use strategy='ring' or 'all_gather' instead.")
  if strategy == "all_gather" and load_balance == "striped":
    raise ValueError(f"{OP}: strategy='all_gather' supports load_balance None or 'zigzag', "
                     "got 'striped'; use strategy='ring' for striped.")


def context_parallel_attention(query, key, value, *, mesh, axis_name="context",
                               strategy="ring", load_balance=None, is_causal=False,
                               segment_ids=None, local_window_size=None, scale=None,
                               implementation=None, return_lse=False):
  """Exact attention with the sequence split over ``mesh``'s ``axis_name``; differentiable.

  Args:
    query: [batch, seq, num_heads, head_dim], natural token order (global array).
    key, value: [batch, seq, num_kv_heads, head_dim].
    mesh: a ``jax.sharding.Mesh``; other axes than ``axis_name`` stay automatic.
    axis_name: the mesh axis that splits the sequence.
    strategy: "ring", "all_gather" or "ulysses" (see the module doc).
    load_balance: None (contiguous), "zigzag" (device p holds chunks p and 2P-1-p of
      T/(2P) tokens) or "striped" (device p holds tokens p, p+P, ...): balances causal work.
    is_causal, segment_ids ([batch, seq] int), local_window_size, scale: as in
      :func:`pallas_kernels.flash_attention`.
    implementation: of the per-device kernels (None, "pallas", "interpret", "xla").
    return_lse: also return the log-sum-exp [batch, seq, num_heads] (float32).

  Returns:
    [batch, seq, num_heads, head_dim] in natural order (and the lse when asked).
  """
  _validate(query, key, value, mesh, axis_name, strategy, load_balance, scale)
  b, t, h, d = query.shape
  num_devices = mesh.shape[axis_name]
  q_seg, kv_seg = flash_ops._split_segments(segment_ids, b, t, t, op=OP)
  window = ring_ops._check_window(OP, local_window_size)
  flash_ops._build_mask(h, is_causal, window, 0, None, None, None, op=OP)
  if implementation == "reference":
    raise ValueError(f"{OP}: implementation must be None, 'pallas', 'interpret' or 'xla'; "
                     "for the reference call pallas_kernels.flash_attention_reference on "
                     "the global arrays.")
  perm = load_balance_permutation(t, num_devices, load_balance)
  inverse = np.argsort(perm)
  reorder = (lambda x: x) if load_balance is None else (lambda x: None if x is None else
                                                         jnp.take(x, perm, axis=1))
  common = dict(axis_name=axis_name, is_causal=is_causal, window=window, scale=scale,
                implementation=implementation, load_balance=load_balance,
                num_devices=num_devices, inverse=inverse, perm=perm)
  local = {"ring": _ring_local, "all_gather": _all_gather_local,
           "ulysses": _ulysses_local}[strategy]

  seq = PartitionSpec(None, axis_name)
  args = (reorder(query), reorder(key), reorder(value), reorder(q_seg), reorder(kv_seg))
  specs = tuple(None if a is None else seq for a in args)
  # check_vma=False: compiled pallas_calls do not yet declare how their outputs vary over
  # manual axes (the XLA path does, through sharding.match_varying).
  fn = jax.shard_map(lambda *a: local(*a, **common), mesh=mesh, in_specs=specs,
                     out_specs=(seq, seq), axis_names={axis_name}, check_vma=False)
  out, lse = fn(*args)
  if load_balance is not None:
    out, lse = jnp.take(out, inverse, axis=1), jnp.take(lse, inverse, axis=1)
  return (out, lse) if return_lse else out


def _ring_local(q, k, v, q_seg, kv_seg, *, axis_name, is_causal, window, scale,
                implementation, load_balance, **_):
  return ring_ops._ring_attention(
      q, k, v, axis_name=axis_name, layout=load_balance or "contiguous", is_causal=is_causal,
      segment_ids=None if q_seg is None else (q_seg, kv_seg), local_window_size=window,
      scale=scale, implementation=implementation, return_lse=True,
      blocks=dict(block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None), op=OP)


def _all_gather_local(q, k, v, q_seg, kv_seg, *, axis_name, is_causal, window, scale,
                      implementation, load_balance, num_devices, inverse, **_):
  """Gathers K/V into natural order; each local query chunk is one flash call whose static
  offset (its global position) is chosen by ``lax.switch`` over the device index."""
  gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
  k, v, kv_seg = gather(k), gather(v), gather(kv_seg)
  if load_balance is not None:
    k, v, kv_seg = (None if x is None else jnp.take(x, inverse, axis=1) for x in (k, v, kv_seg))
  b, tl, h, d = q.shape
  t, P = k.shape[1], num_devices
  n = 2 if load_balance == "zigzag" else 1
  c = tl // n
  starts = [[(p if i == 0 else 2 * P - 1 - p) * c if n == 2 else p * tl for i in range(n)]
            for p in range(P)]

  impl = dispatch.resolve_implementation(OP, implementation, dispatch.platform_of(q, k, v))
  backend = "xla" if impl == "xla" else dispatch.pallas_backend(dispatch.platform_of(q))
  module = flash_ops._backend_module(backend)
  mask = flash_ops._build_mask(h, is_causal, window, 0, None, None, None, op=OP)
  sizes = flash_ops._block_sizes(module, module.MIN_BLOCK, c, t, dict(
      block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None), mask, op=OP)
  c_pad = padding.round_up(c, math.lcm(sizes["block_q"], sizes["block_q_bwd"]))
  t_pad = padding.round_up(t, math.lcm(sizes["block_k"], sizes["block_k_bwd"]))
  d_pad = module.padded_head_dim(d)
  scale = float(d ** -0.5 if scale is None else scale)

  def layout(x, length):
    x = jnp.transpose(x, (0, 2, 1, 3))
    return padding.pad_axis(padding.pad_axis(x, 2, length), 3, d_pad)

  kk, vv = layout(k, t_pad), layout(v, t_pad)
  ks = None if kv_seg is None else jnp.pad(kv_seg, ((0, 0), (0, t_pad - t)), mode="edge")
  p_idx = lax.axis_index(axis_name)
  outs, lses = [], []
  for i in range(n):
    qi = layout(q[:, i * c:(i + 1) * c], c_pad)
    qs = None if q_seg is None else jnp.pad(q_seg[:, i * c:(i + 1) * c],
                                            ((0, 0), (0, c_pad - c)), mode="edge")

    def branch(start, qi, kk, vv, qs, ks):
      config = flash_ops._Config(
          backend=backend, scale=scale, mask=mask, logits_soft_cap=None, q_offset=start,
          kv_len=t, interpret=(impl == "interpret"), **sizes)
      return flash_ops._flash(qi, kk, vv, qs, ks, config)

    branches = [lambda *a, s=starts[p][i]: branch(s, *a) for p in range(P)]
    o, lse = lax.switch(p_idx, branches, qi, kk, vv, qs, ks)
    outs.append(jnp.transpose(o[:, :, :c, :d], (0, 2, 1, 3)))
    lses.append(jnp.transpose(lse[:, :, :c], (0, 2, 1)))
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _ulysses_local(q, k, v, q_seg, kv_seg, *, axis_name, is_causal, window, scale,
                   implementation, load_balance, inverse, perm, **_):
  """All-to-all sequence -> heads, full attention on H/P heads, all-to-all back."""
  to_heads = lambda x: lax.all_to_all(x, axis_name, 2, 1, tiled=True)  # noqa: E731
  to_seq = lambda x: lax.all_to_all(x, axis_name, 1, 2, tiled=True)  # noqa: E731
  q, k, v = to_heads(q), to_heads(k), to_heads(v)
  gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
  q_seg, kv_seg = gather(q_seg), gather(kv_seg)
  natural = (lambda x: x) if load_balance is None else (
      lambda x: None if x is None else jnp.take(x, inverse, axis=1))
  out, lse = flash_attention(
      natural(q), natural(k), natural(v), is_causal=is_causal, local_window_size=window,
      scale=scale, segment_ids=None if q_seg is None else (natural(q_seg), natural(kv_seg)),
      implementation=implementation, return_lse=True)
  if load_balance is not None:
    out, lse = jnp.take(out, perm, axis=1), jnp.take(lse, perm, axis=1)
  return to_seq(out), to_seq(lse[..., None])[..., 0]
