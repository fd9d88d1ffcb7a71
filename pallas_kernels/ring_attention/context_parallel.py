"""Context parallelism: attention over a sequence split over a mesh axis, several strategies.

Two entry points with the same strategies:

* :func:`context_parallel_attention` takes global arrays in natural token order and a mesh,
  and runs the per-device computation under its own ``shard_map``;
* :func:`context_parallel_shard` is that per-device computation, to call inside a
  ``shard_map`` the caller owns (the training code's, which also splits batch and heads).

Strategies (per device, sequence split over P devices, T tokens, H query and Hk kv heads,
head_dim D; see docs/context_parallelism.md for the costs):

* ``"ring"``: :func:`ring_attention`: K/V blocks travel around the ring (P-1 ppermutes of
  2·Hk·D·T/P values), O(T/P) memory;
* ``"all_gather"``: gather K/V once (2·Hk·D·T values per device), attend with the local
  queries (one flash call per local query chunk, with its static offset picked by
  ``lax.switch`` over the device index);
* ``"ulysses"``: all-to-all from sequence to heads, full attention on H/P heads on every
  device, all-to-all back (needs heads and kv heads divisible by P).

Load balance (``None`` | ``"zigzag"`` | ``"striped"``, :mod:`.layouts`) spreads the causal
work evenly. Tokens arrive either in the natural order (``token_order="natural"``: contiguous
shards, moved to the balanced layout and back inside the shard with ppermute / all_to_all)
or already in the balanced order (``token_order="balanced"``: the data pipeline emitted the
rows permuted, positions and segment ids alike; no movement). Ulysses gathers the whole
sequence per head anyway, so natural-order tokens need no balancing there.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from pallas_kernels._common import dispatch, sharding
from pallas_kernels.flash_attention import ops as flash_ops
from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.ring_attention import layouts
from pallas_kernels.ring_attention import ops as ring_ops
from pallas_kernels.ring_attention.layouts import LOAD_BALANCES, load_balance_permutation

OP = "context_parallel_attention"
SHARD_OP = "context_parallel_shard"
STRATEGIES = ("ring", "all_gather", "ulysses")
TOKEN_ORDERS = ("natural", "balanced")

__all__ = ["LOAD_BALANCES", "STRATEGIES", "TOKEN_ORDERS", "context_parallel_attention",
           "context_parallel_shard", "load_balance_permutation", "validate_configuration"]


def validate_configuration(*, strategy, load_balance, num_devices, seq_len=None,
                           num_heads=None, num_kv_heads=None, token_order="natural",
                           axis_name="context", op=OP):
  """Raises a ValueError that says what to change if the configuration cannot run.

  Args:
    strategy, load_balance, token_order: as in :func:`context_parallel_shard`.
    num_devices: size of the context axis.
    seq_len: GLOBAL sequence length (None: not checked).
    num_heads, num_kv_heads: heads that reach the kernel on one device (after any tensor
      parallel split), for Ulysses (None: not checked).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"{op}: strategy must be one of {STRATEGIES}, got {strategy!r}.")
  if load_balance not in LOAD_BALANCES:
    raise ValueError(f"{op}: load_balance must be one of {LOAD_BALANCES}, got "
                     f"{load_balance!r}.")
  if token_order not in TOKEN_ORDERS:
    raise ValueError(f"{op}: token_order must be one of {TOKEN_ORDERS}, got {token_order!r}.")
  if token_order == "balanced" and load_balance is None:
    raise ValueError(f"{op}: token_order='balanced' needs a load_balance ('zigzag' or "
                     "'striped') that says which order the tokens are in.")
  if strategy == "all_gather" and load_balance == "striped":
    raise ValueError(f"{op}: strategy='all_gather' supports load_balance None or 'zigzag', "
                     "got 'striped'; use strategy='ring' for striped.")
  p = num_devices
  if seq_len is not None:
    parts = 2 * p if load_balance == "zigzag" else p
    if seq_len % parts:
      what = (f"2 x the size of axis {axis_name!r} ({parts}; zigzag holds two chunks per "
              "device)" if load_balance == "zigzag" else f"the size of axis {axis_name!r} ({p})")
      raise ValueError(f"{op}: the sequence length {seq_len} must be divisible by {what}; pad "
                       "the sequence or change the mesh.")
    moves = (token_order == "natural" and strategy != "ulysses" and load_balance == "striped")
    if moves and (seq_len // p) % p:
      raise ValueError(
          f"{op}: load_balance='striped' with tokens in natural order moves them to the "
          f"striped layout inside shard_map, which needs the sequence length ({seq_len}) to be "
          f"divisible by the square of the size of axis {axis_name!r} ({p}^2 = {p * p}); pad "
          "the sequence, use load_balance='zigzag', or emit the rows in the striped order "
          "from the data pipeline (token_order='balanced').")
  if strategy == "ulysses" and num_heads is not None and (num_heads % p or num_kv_heads % p):
    raise ValueError(f"{op}: strategy='ulysses' splits heads over axis {axis_name!r} of size "
                     f"{p}: num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) must both "
                     "be divisible by it. Use strategy='ring' or 'all_gather' instead.")


def _common_checks(query, key, value, scale, logits_soft_cap, implementation, op):
  flash_ops.validate_inputs(query, key, value, scale, logits_soft_cap, op=op)
  if key.shape[1] != query.shape[1]:
    raise ValueError(f"{op}: query and key/value must have the same sequence length "
                     f"(self-attention over one sharded sequence), got query "
                     f"{tuple(query.shape)} and key {tuple(key.shape)}.")
  if implementation == "reference":
    raise ValueError(f"{op}: implementation must be None, 'pallas', 'interpret' or 'xla'; "
                     "for the reference call pallas_kernels.flash_attention_reference on "
                     "the global arrays.")


def context_parallel_attention(query, key, value, *, mesh, axis_name="context",
                               strategy="ring", load_balance=None, is_causal=False,
                               segment_ids=None, local_window_size=None, scale=None,
                               logits_soft_cap=None, implementation=None, return_lse=False):
  """Exact attention with the sequence split over ``mesh``'s ``axis_name``; differentiable.

  Args:
    query: [batch, seq, num_heads, head_dim], natural token order (global array).
    key, value: [batch, seq, num_kv_heads, head_dim].
    mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``) whose axes may be of any type: Auto
      (``jax.sharding.Mesh``'s default), Explicit (``jax.make_mesh``'s default) or a mix.
      The inputs may be sharded any way (or not at all): they are resharded here. The other
      axes split the batch when their product divides it (else every one of their devices
      computes the whole batch).
    axis_name: the mesh axis that splits the sequence.
    strategy: "ring", "all_gather" or "ulysses" (see the module doc).
    load_balance: None (contiguous), "zigzag" (device p holds chunks p and 2P-1-p of
      T/(2P) tokens) or "striped" (device p holds tokens p, p+P, ...): balances causal work.
    is_causal, segment_ids ([batch, seq] int), local_window_size, scale, logits_soft_cap: as
      in :func:`pallas_kernels.flash_attention`.
    implementation: of the per-device kernels (None, "pallas", "interpret", "xla").
    return_lse: also return the log-sum-exp [batch, seq, num_heads] (float32).

  Returns:
    [batch, seq, num_heads, head_dim] in natural order (and the lse when asked), sharded
    ``PartitionSpec(batch_axes, axis_name)`` over ``mesh`` (batch_axes: the other axes, or
    None as above); along Explicit axes that sharding is the outputs' type.
  """
  _common_checks(query, key, value, scale, logits_soft_cap, implementation, OP)
  if axis_name not in mesh.axis_names:
    raise ValueError(f"{OP}: axis_name {axis_name!r} is not an axis of the mesh "
                     f"{dict(mesh.shape)}.")
  b, t, h, _ = query.shape
  p = mesh.shape[axis_name]
  q_seg, kv_seg = flash_ops.split_segments(segment_ids, b, t, t, op=OP)
  # Tokens are moved to the balanced layout inside the shard when its shards allow it, else
  # the global arrays are permuted here (XLA may gather them to do so).
  in_shard = (layouts.in_shard_layout_error(t // p if t % p == 0 else 1, p, load_balance)
              is None)
  token_order = "natural" if in_shard or strategy == "ulysses" else "balanced"
  validate_configuration(strategy=strategy, load_balance=load_balance, num_devices=p,
                         seq_len=t, num_heads=h, num_kv_heads=key.shape[2],
                         token_order=token_order, axis_name=axis_name)
  window = ring_ops._check_window(OP, local_window_size)
  flash_ops.build_mask(h, is_causal, window, 0, None, None, None, op=OP)
  impl = dispatch.resolve_implementation(OP, implementation,
                                         dispatch.platform_of(query, key, value))

  permute = token_order == "balanced" and load_balance is not None
  perm = load_balance_permutation(t, p, load_balance)

  # Every mesh axis is manual (a Mosaic kernel cannot be partitioned automatically): the
  # other axes split the batch where their product divides it, else they replicate it.
  others = tuple(a for a in mesh.axis_names if a != axis_name)
  batch_axes = others if others and b % math.prod(mesh.shape[a] for a in others) == 0 else None
  seq = PartitionSpec(batch_axes, axis_name)
  # Explicit mesh axes: shard_map takes only arguments whose type already has its in_specs
  # (Auto axes it reshards itself), and a gather along a dimension typed as split is refused:
  # reshard to the whole sequence around the global permutations, to ``seq`` around shard_map.
  whole = PartitionSpec(batch_axes)
  place = lambda x, spec: sharding.reshard_explicit(x, spec, mesh)  # noqa: E731

  def arrange(x, order):
    """``x`` permuted by ``order`` along the sequence (when given), placed in ``seq``."""
    if x is not None and order is not None:
      x = jnp.take(place(x, whole), order, axis=1)
    return place(x, seq)

  order = perm if permute else None
  args = tuple(arrange(x, order) for x in (query, key, value, q_seg, kv_seg))
  specs = tuple(None if a is None else seq for a in args)
  config = (("axis_name", axis_name), ("strategy", strategy), ("load_balance", load_balance),
            ("token_order", token_order), ("is_causal", bool(is_causal)),
            ("local_window_size", window), ("scale", scale),
            ("logits_soft_cap", logits_soft_cap), ("implementation", impl))
  # The kernels are picked when the shard is traced, for the platform a trace sees (the
  # default backend, or dispatch.target_platform's) and the GPU kernel family asked for:
  # part of the cache key.
  traced_platform = (dispatch.platform_of(), os.environ.get(flash_ops.GPU_KERNELS_ENV))
  try:
    fn = _sharded(mesh, specs, seq, config, traced_platform)
  except TypeError:  # An unhashable setting (e.g. an array scale): not cached.
    fn = _sharded.__wrapped__(mesh, specs, seq, config, traced_platform)
  out, lse = fn(*args)
  if permute:
    inverse = np.argsort(perm)
    out, lse = arrange(out, inverse), arrange(lse, inverse)
  return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=32)
def _sharded(mesh, specs, seq, config, traced_platform):
  """``jax.jit(jax.shard_map(context_parallel_shard))`` over ``mesh``, cached per settings.

  ``config``: the keyword arguments of :func:`context_parallel_shard` as (name, value)
  pairs; ``traced_platform``: only a cache key. Under jit: an inner call of the caller's
  program. Eager: one compiled program (an eager ``shard_map`` would run the ring's loop op
  by op, tens of seconds even at 64 tokens), compiled once per mesh, shapes and settings.
  """
  del traced_platform
  kw = dict(config)

  def local(q, k, v, q_seg, kv_seg):
    return context_parallel_shard(
        q, k, v, segment_ids=None if q_seg is None else (q_seg, kv_seg), return_lse=True,
        **kw)

  # check_vma=True where every primitive declares how its outputs vary over the manual axes.
  # A pallas_call (compiled or interpreted) must be told through the manual_axis_type of its
  # out_shape, which the flash kernels do not set yet (see pallas_kernels/_common/sharding.py
  # ``varying_shape``): with them, shard_map's check is off.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(seq, seq),
                               check_vma=(kw["implementation"] == "xla")))


def context_parallel_shard(query, key, value, *, axis_name, strategy="ring", load_balance=None,
                           token_order="natural", is_causal=False, segment_ids=None,
                           local_window_size=None, scale=None, logits_soft_cap=None,
                           implementation=None, return_lse=False):
  """Context-parallel attention on this device's shard; call inside ``shard_map``.

  Args:
    query: this device's [batch, local_len, num_heads, head_dim] of a sequence whose
      dimension 1 is split over ``axis_name`` (P devices, T = P * local_len tokens).
    key, value: [batch, local_len, num_kv_heads, head_dim].
    axis_name: the mesh axis (or tuple of axes) the sequence is split over.
    strategy: "ring", "all_gather" or "ulysses".
    load_balance: None, "zigzag" or "striped".
    token_order: "natural": device p holds tokens [p * local_len, (p + 1) * local_len)
      (moved to the ``load_balance`` layout and back here); "balanced": the shards are
      already those of the ``load_balance`` layout (:func:`load_balance_permutation`), and
      the output comes back in that layout too.
    is_causal, segment_ids ([batch, local_len] int, or a (q, kv) pair), local_window_size,
      scale, logits_soft_cap: over GLOBAL positions, as in :func:`flash_attention`.
    implementation: of the per-device kernels (None, "pallas", "interpret", "xla").
    return_lse: also return the lse [batch, local_len, num_heads] (float32).

  Returns:
    [batch, local_len, num_heads, head_dim] in the input's token order (and the lse).
  """
  _common_checks(query, key, value, scale, logits_soft_cap, implementation, SHARD_OP)
  b, tl, h, _ = query.shape
  p = ring_ops.axis_size(SHARD_OP, axis_name)
  validate_configuration(strategy=strategy, load_balance=load_balance, num_devices=p,
                         seq_len=tl * p, num_heads=h, num_kv_heads=key.shape[2],
                         token_order=token_order, axis_name=axis_name, op=SHARD_OP)
  q_seg, kv_seg = flash_ops.split_segments(segment_ids, b, tl, tl, op=SHARD_OP)
  window = ring_ops._check_window(SHARD_OP, local_window_size)
  flash_ops.build_mask(h, is_causal, window, 0, None, None, None, op=SHARD_OP)
  common = dict(axis_name=axis_name, is_causal=is_causal, window=window, scale=scale,
                soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                implementation=implementation, load_balance=load_balance, num_devices=p,
                token_order=token_order)
  local = {"ring": _ring_local, "all_gather": _all_gather_local,
           "ulysses": _ulysses_local}[strategy]
  out, lse = local(query, key, value, q_seg, kv_seg, **common)
  return (out, lse) if return_lse else out


def _move(token_order, load_balance, axis_name, num_devices):
  """(to, back): the moves between the input order and the balanced layout (identities when
  the tokens already are in it, or there is no balancing)."""
  if token_order == "balanced" or load_balance is None:
    same = lambda x: x  # noqa: E731
    return same, same
  kw = dict(axis_name=axis_name, num_devices=num_devices, load_balance=load_balance)
  return (lambda x: layouts.to_layout(x, **kw)), (lambda x: layouts.from_layout(x, **kw))


def _ring_local(q, k, v, q_seg, kv_seg, *, axis_name, is_causal, window, scale, soft_cap,
                implementation, load_balance, num_devices, token_order):
  to, back = _move(token_order, load_balance, axis_name, num_devices)
  q, k, v, q_seg, kv_seg = (to(x) for x in (q, k, v, q_seg, kv_seg))
  out, lse = ring_ops._ring_attention(
      q, k, v, axis_name=axis_name, layout=load_balance or "contiguous", is_causal=is_causal,
      segment_ids=None if q_seg is None else (q_seg, kv_seg), local_window_size=window,
      scale=scale, logits_soft_cap=soft_cap, implementation=implementation, return_lse=True,
      blocks=dict(block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None), op=SHARD_OP)
  return back(out), back(lse)


def _all_gather_local(q, k, v, q_seg, kv_seg, *, axis_name, is_causal, window, scale, soft_cap,
                      implementation, load_balance, num_devices, token_order):
  """Gathers K/V into natural order; each local query chunk is one flash call whose static
  offset (its global position) is chosen by ``lax.switch`` over the device index."""
  gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
  k, v, kv_seg = gather(k), gather(v), gather(kv_seg)
  t, P = k.shape[1], num_devices
  if token_order == "balanced" and load_balance is not None:  # Gathered in the balanced order.
    inverse = np.argsort(load_balance_permutation(t, P, load_balance))
    k, v, kv_seg = (None if x is None else jnp.take(x, inverse, axis=1) for x in (k, v, kv_seg))
  to, back = _move(token_order, load_balance, axis_name, num_devices)
  q, q_seg = to(q), to(q_seg)
  b, tl, h, d = q.shape
  n = 2 if load_balance == "zigzag" else 1
  c = tl // n
  starts = [[(p if i == 0 else 2 * P - 1 - p) * c if n == 2 else p * tl for i in range(n)]
            for p in range(P)]

  platform = dispatch.platform_of(q, k, v)
  impl = dispatch.resolve_implementation(SHARD_OP, implementation, platform)
  backend = "xla" if impl == "xla" else dispatch.pallas_backend(platform)
  spec = flash_ops.backend_spec(backend)
  mask = flash_ops.build_mask(h, is_causal, window, 0, None, None, None, op=SHARD_OP)
  sizes = flash_ops.block_sizes(spec, c, t, dict(
      block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None), mask, op=SHARD_OP)
  scale = float(d ** -0.5 if scale is None else scale)
  # K/V are laid out once for every query chunk (transposed and padded on "bhtd" backends).
  c_pad = t_pad = None
  if spec.layout == "bhtd":
    c_pad = flash_ops.padded_length(c, sizes["block_q"], sizes["block_q_bwd"])
    t_pad = flash_ops.padded_length(t, sizes["block_k"], sizes["block_k_bwd"])
  kk, vv = (flash_ops.to_kernel_layout(x, spec, t_pad) for x in (k, v))
  ks = flash_ops.pad_segments(kv_seg, t_pad) if t_pad else kv_seg
  p_idx = lax.axis_index(axis_name)
  outs, lses = [], []
  for i in range(n):
    qi = flash_ops.to_kernel_layout(q[:, i * c:(i + 1) * c], spec, c_pad)
    qs = None if q_seg is None else q_seg[:, i * c:(i + 1) * c]
    qs = flash_ops.pad_segments(qs, c_pad) if c_pad else qs

    def branch(start, qi, kk, vv, qs, ks):
      config = flash_ops.FlashConfig(
          backend=backend, scale=scale, mask=mask, logits_soft_cap=soft_cap, q_offset=start,
          kv_len=t, interpret=(impl == "interpret"), q_len=c, **sizes)
      return flash_ops.flash_core(qi, kk, vv, qs, ks, config)

    distinct = sorted({starts[p][i] for p in range(P)})
    branches = [lambda *a, s=s: branch(s, *a) for s in distinct]
    index = jnp.asarray([distinct.index(starts[p][i]) for p in range(P)], jnp.int32)[p_idx]
    o, lse = lax.switch(index, branches, qi, kk, vv, qs, ks)
    o, lse = flash_ops.from_kernel_layout(o, lse, spec, c, d)
    outs.append(o)
    lses.append(lse)
  return back(jnp.concatenate(outs, axis=1)), back(jnp.concatenate(lses, axis=1))


def _ulysses_local(q, k, v, q_seg, kv_seg, *, axis_name, is_causal, window, scale, soft_cap,
                   implementation, load_balance, num_devices, token_order):
  """All-to-all sequence -> heads, full attention on H/P heads, all-to-all back."""
  to_heads = lambda x: lax.all_to_all(x, axis_name, 2, 1, tiled=True)  # noqa: E731
  to_seq = lambda x: lax.all_to_all(x, axis_name, 1, 2, tiled=True)  # noqa: E731
  q, k, v = to_heads(q), to_heads(k), to_heads(v)
  gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
  q_seg, kv_seg = gather(q_seg), gather(kv_seg)
  permuted = token_order == "balanced" and load_balance is not None
  if permuted:  # The gathered sequence is in the balanced order: attend in natural order.
    perm = load_balance_permutation(q.shape[1], num_devices, load_balance)
    inverse = np.argsort(perm)
    q, k, v, q_seg, kv_seg = (None if x is None else jnp.take(x, inverse, axis=1)
                              for x in (q, k, v, q_seg, kv_seg))
  out, lse = flash_attention(
      q, k, v, is_causal=is_causal, local_window_size=window, scale=scale,
      segment_ids=None if q_seg is None else (q_seg, kv_seg), logits_soft_cap=soft_cap,
      implementation=implementation, return_lse=True)
  if permuted:
    out, lse = jnp.take(out, perm, axis=1), jnp.take(lse, perm, axis=1)
  return to_seq(out), to_seq(lse[..., None])[..., 0]
