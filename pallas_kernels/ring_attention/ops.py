"""Ring attention: exact attention over a sequence split across the devices of a mesh axis.

Called inside ``shard_map`` with the sequence dimension split over ``axis_name``. Each device
keeps its queries; the K/V blocks (with their own, fewer GQA heads: never repeated) travel
around the ring with ``lax.ppermute`` while the flash kernel works on the block in hand, and
the running output and log-sum-exp are merged in float32. The kernels return their partial
outputs (and, in the backward, their partial gradients) in float32 where the backend can
(``BackendSpec.takes_partial_dtypes``), so nothing is rounded to the input dtype before the
merge; only the final output and gradients are.

A (query chunk, key chunk) pair is one flash-kernel call with a *static* query offset and
mask; which pair a device holds at a ring step depends on its traced ``axis_index``, so each
pair is a ``lax.switch`` over the static pairs that can see anything (a table, indexed by
(device, source device, query chunk, key chunk), picks the branch). Pairs that causality or
the window hide entirely map to a branch that returns (0, -inf) without calling a kernel.

The layouts (where the tokens of each device sit in the global sequence):

* ``"contiguous"``: device p holds tokens [p*T/P, (p+1)*T/P): one chunk, query offset
  (p - s) * T/P against the block of device s (masks are translation invariant);
* ``"zigzag"``: device p holds chunks p and 2P-1-p of T/(2P) tokens: two chunks, offset
  (c_q - c_k) * T/(2P) for each pair of chunks;
* ``"striped"``: device p holds tokens p, p+P, p+2P, ...: one chunk, and the global mask
  becomes, in local indices, a band j - i in [lo, hi] that depends only on p - s.

The backward pass (``jax.custom_vjp``; residuals are the local q, k, v, out, lse only, so
memory is O(T/P) per device) rotates K/V again, with their dK/dV accumulators travelling
alongside (after P steps they are home), and runs the flash backward per pair with the
GLOBAL out and lse: dS = P * (dP - delta), delta = rowsum(dO * O) - dLSE, P from the global
lse, is exact per block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._common import block_sparsity, dispatch, sharding
from pallas_kernels._common import masks as masks_lib
from pallas_kernels.flash_attention import ops as flash_ops
from pallas_kernels.flash_attention.backends import backend_spec

OP = "ring_attention"
LAYOUTS = ("contiguous", "zigzag", "striped")


# ---------------------------------------------------------------------------------------
# Static geometry: which (mask, q_offset) each pair of chunks needs.


def axis_size(op: str, axis_name) -> int:
  """Static size of ``axis_name`` (a name or a tuple of names) inside shard_map."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  size = 1
  for name in names:
    try:
      size *= int(lax.axis_size(name))
    except NameError:
      raise ValueError(
          f"{op}: axis_name {name!r} is not a mesh axis bound here. Call {op} inside "
          "jax.shard_map (with the sequence dimension split over that axis), or use "
          "context_parallel_attention, which takes global arrays and a mesh.") from None
  return size


def _visibility(mask: masks_lib.Mask, q_offset: int, length: int):
  """(any, all): whether queries at positions q_offset + [0, length) see any key of
  [0, length), and whether they see every one of them."""
  sparsity = block_sparsity.block_sparsity(
      mask, q_len=length - q_offset, kv_len=length, block_q=length, block_k=length,
      num_q_blocks=1, num_kv_blocks=1)
  iv = sparsity.intervals
  return bool((iv[..., 1] > iv[..., 0]).any()), bool((iv[..., 3] > iv[..., 2]).all())


_FULL_PAIR = (masks_lib.FullMask(), 0)


def _band_mask(lo, hi):
  """Mask and q_offset of the local band lo <= j - i <= hi (None: unbounded); None if empty."""
  if lo is not None and hi is not None and lo > hi:
    return None
  if hi is not None:
    mask = masks_lib.CausalMask() if lo is None else masks_lib.LocalMask(hi - lo, 0)
    return mask, hi
  if lo is not None:
    return masks_lib.LocalMask(0, None), lo
  return masks_lib.FullMask(), 0


def _striped_pair(is_causal, window, d, num_devices):
  """(mask, q_offset) in local indices for striped queries of device p against keys of
  device s = p - d: global positions i*P + p and j*P + s."""
  left, right = (None, None) if window is None else window
  his = []
  if is_causal:  # j*P + s <= i*P + p  <=>  j - i <= floor(d / P)
    his.append(d // num_devices)
  if right is not None:  # j*P + s <= i*P + p + right
    his.append((d + right) // num_devices)
  hi = min(his) if his else None
  lo = None if left is None else -((left - d) // num_devices)  # ceil((d - left) / P)
  return _band_mask(lo, hi)


def chunk_geometry(layout: str, num_devices: int, local_len: int, mask, is_causal, window):
  """Static description of the pairs: (num_chunks, chunk_len, pairs, table).

  ``pairs`` lists the distinct visible (mask, q_offset) of a (query chunk, key chunk) pair;
  ``table[((p * P + s) * n + i) * n + j]`` is 0 when chunk i of device p sees nothing of
  chunk j of device s, else 1 + the index of its pair. Pairs whose queries see every key
  share one unmasked branch, whatever their offset: with causality, all the pairs below the
  diagonal are one kernel, so the number of branches (and compile time) stays small.
  """
  P = num_devices
  if layout == "contiguous":
    n, c = 1, local_len
    chunk_pos = lambda p, i: p  # noqa: E731  (chunk index in units of c)
  elif layout == "zigzag":
    n, c = 2, local_len // 2
    chunk_pos = lambda p, i: p if i == 0 else 2 * P - 1 - p  # noqa: E731
  elif layout == "striped":
    n, c = 1, local_len
  else:
    raise ValueError(f"{OP}: layout must be one of {LAYOUTS}, got {layout!r}.")
  pairs, index, table = [], {}, np.zeros((P * P * n * n,), np.int32)
  for p in range(P):
    for s in range(P):
      for i in range(n):
        for j in range(n):
          if layout == "striped":
            pair = _striped_pair(is_causal, window, p - s, P)
          else:
            pair = (mask, (chunk_pos(p, i) - chunk_pos(s, j)) * c)
          if pair is None:
            continue
          visible, full = _visibility(pair[0], pair[1], c)
          if not visible:
            continue
          pair = _FULL_PAIR if full else pair
          if pair not in index:
            index[pair] = len(pairs)
            pairs.append(pair)
          table[((p * P + s) * n + i) * n + j] = 1 + index[pair]
  return n, c, tuple(pairs), tuple(int(t) for t in table)


# ---------------------------------------------------------------------------------------
# The ring, on kernel-layout chunks: for a "bhtd" backend q [n, B, H, Cp, Dp] and k/v
# [n, B, Hk, Cp, Dp] (padded); for a "bthd" backend q [n, B, C, H, D], k/v [n, B, C, Hk, D]
# (the user's arrays, reshaped). lse is [n, B, H, Cp or C] in both.


@dataclasses.dataclass(frozen=True)
class _RingConfig:
  axis_name: object
  num_devices: int
  num_chunks: int
  chunk_len: int  # True chunk length (kv_len of every pair); arrays are padded beyond it.
  pairs: tuple  # ((mask, q_offset), ...)
  table: tuple
  backend: str
  scale: float
  logits_soft_cap: float | None
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  interpret: bool

  @property
  def spec(self):
    return backend_spec(self.backend)

  @property
  def partial_dtype(self):
    """float32 when the backend returns float32 partials, else None (the input dtype)."""
    return jnp.float32 if self.spec.takes_partial_dtypes else None

  def kernel_kwargs(self, pair, backward):
    mask, q_offset = pair
    kw = dict(scale=self.scale, mask=mask, logits_soft_cap=self.logits_soft_cap,
              q_offset=q_offset, kv_len=self.chunk_len, interpret=self.interpret,
              block_q=self.block_q_bwd if backward else self.block_q,
              block_k=self.block_k_bwd if backward else self.block_k)
    if backward:
      kw.update(self.spec.backward_kwargs(q_len=self.chunk_len, grad_dtype=self.partial_dtype))
    else:
      kw.update(self.spec.forward_kwargs(q_len=self.chunk_len, out_dtype=self.partial_dtype))
    return kw

  def lse_shape(self, q_shape):
    """[B, H, rows] of a query chunk of shape ``q_shape`` (without the chunk axis)."""
    if self.spec.layout == "bthd":
      return (q_shape[0], q_shape[2], q_shape[1])
    return tuple(q_shape[:3])

  @property
  def axes(self):
    return self.axis_name if isinstance(self.axis_name, tuple) else (self.axis_name,)

  def branch(self, p, s, i, j):
    n, P = self.num_chunks, self.num_devices
    return jnp.asarray(self.table, jnp.int32)[((p * P + s) * n + i) * n + j]


def _rotate(tree, config):
  """Sends every device's block to the next device of the ring (p -> p + 1)."""
  P = config.num_devices
  perm = [(i, (i + 1) % P) for i in range(P)]
  return jax.tree.map(lambda x: lax.ppermute(x, config.axis_name, perm), tree)


def _chunk(x, i):
  return None if x is None else x[i]


def _merge(o, lse, o_b, lse_b, layout="bhtd"):
  """Log-sum-exp merge of a running (o, lse) with one block's (o_b, lse_b), in float32.

  lse is [B, H, T]; o is [B, H, T, D] (``layout="bhtd"``) or [B, T, H, D] (``"bthd"``).
  """
  m = jnp.maximum(lse, lse_b)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  w, w_b = jnp.exp(lse - m_safe), jnp.exp(lse_b - m_safe)
  total = w + w_b
  safe = jnp.where(total == 0, 1.0, total)
  rows = (lambda x: jnp.swapaxes(x, 1, 2)[..., None]) if layout == "bthd" else (  # noqa: E731
      lambda x: x[..., None])
  o = (o * rows(w) + o_b.astype(jnp.float32) * rows(w_b)) / rows(safe)
  lse = jnp.where(total == 0, -jnp.inf, m_safe + jnp.log(safe))
  return o, lse


def _forward_branches(config):
  module = config.spec.module
  out_dtype = config.partial_dtype

  def empty(q, k, v, qs, ks):
    vary = lambda x: sharding.match_varying(x, q, k, v, qs, ks, axes=config.axes)  # noqa: E731
    return (vary(jnp.zeros(q.shape, out_dtype or q.dtype)),
            vary(jnp.full(config.lse_shape(q.shape), -jnp.inf, jnp.float32)))

  def attend(pair, q, k, v, qs, ks):
    return module.flash_forward(q, k, v, qs, ks, **config.kernel_kwargs(pair, False))

  return [empty] + [functools.partial(attend, pair) for pair in config.pairs]


def _backward_branches(config):
  module = config.spec.module
  grad_dtype = config.partial_dtype

  def empty(q, k, v, qs, ks, out, lse, d_out, d_lse):
    vary = lambda x: sharding.match_varying(  # noqa: E731
        x, q, k, v, qs, ks, out, lse, d_out, d_lse, axes=config.axes)
    return tuple(vary(jnp.zeros(x.shape, grad_dtype or x.dtype)) for x in (q, k, v))

  def grads(pair, q, k, v, qs, ks, out, lse, d_out, d_lse):
    return module.flash_backward(q, k, v, qs, ks, out, lse, d_out, d_lse=d_lse,
                                 **config.kernel_kwargs(pair, True))

  return [empty] + [functools.partial(grads, pair) for pair in config.pairs]


def _source(p, step, config):
  """The device whose K/V block device p holds at ``step`` of the ring."""
  return jnp.mod(p - step, config.num_devices)


def _forward(q, k, v, q_seg, kv_seg, config):
  n = config.num_chunks
  p = lax.axis_index(config.axis_name)
  branches = _forward_branches(config)

  def attend(step, kv, acc):
    k, v, ks = kv
    s = _source(p, step, config)
    out = []
    for i in range(n):
      o_i, lse_i = acc[i]
      for j in range(n):
        o_b, lse_b = lax.switch(config.branch(p, s, i, j), branches, q[i], k[j], v[j],
                                _chunk(q_seg, i), _chunk(ks, j))
        o_i, lse_i = _merge(o_i, lse_i, o_b, lse_b, config.spec.layout)
      out.append((o_i, lse_i))
    return tuple(out)

  def body(step, carry):
    kv, acc = carry
    following = _rotate(kv, config)  # In flight while this block is computed.
    return following, attend(step, kv, acc)

  vary = lambda x: sharding.match_varying(x, q, k, v, q_seg, kv_seg, axes=config.axes)  # noqa: E731
  acc = tuple((vary(jnp.zeros(q.shape[1:], jnp.float32)),
               vary(jnp.full(config.lse_shape(q.shape[1:]), -jnp.inf, jnp.float32)))
              for _ in range(n))
  kv, acc = lax.fori_loop(0, config.num_devices - 1, body, ((k, v, kv_seg), acc))
  acc = attend(config.num_devices - 1, kv, acc)
  out = jnp.stack([o for o, _ in acc]).astype(q.dtype)
  lse = jnp.stack([l for _, l in acc])
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_seg, kv_seg, config: _RingConfig):
  return _forward(q, k, v, q_seg, kv_seg, config)


def _ring_fwd(q, k, v, q_seg, kv_seg, config):
  out, lse = _forward(q, k, v, q_seg, kv_seg, config)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(config, residuals, cotangents):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  d_out, d_lse = cotangents
  n = config.num_chunks
  p = lax.axis_index(config.axis_name)
  branches = _backward_branches(config)

  def grads(step, kv, dkv, dq):
    k, v, ks = kv
    dk, dv = dkv
    s = _source(p, step, config)
    dq, dk, dv = list(dq), list(dk), list(dv)
    for i in range(n):
      for j in range(n):
        dq_b, dk_b, dv_b = lax.switch(
            config.branch(p, s, i, j), branches, q[i], k[j], v[j], _chunk(q_seg, i),
            _chunk(ks, j), out[i], lse[i], d_out[i], d_lse[i])
        dq[i] = dq[i] + dq_b.astype(jnp.float32)
        dk[j] = dk[j] + dk_b.astype(jnp.float32)
        dv[j] = dv[j] + dv_b.astype(jnp.float32)
    return (tuple(dk), tuple(dv)), tuple(dq)

  def body(step, carry):
    kv, dkv, dq = carry
    following = _rotate(kv, config)
    dkv, dq = grads(step, kv, dkv, dq)
    # The accumulators travel with their K/V block: after P rotations they are home.
    return following, _rotate(dkv, config), dq

  def zeros(x):
    return tuple(sharding.match_varying(jnp.zeros(x.shape[1:], jnp.float32), *residuals,
                                        d_out, d_lse, axes=config.axes) for _ in range(n))

  carry = ((k, v, kv_seg), (zeros(k), zeros(v)), zeros(q))
  kv, dkv, dq = lax.fori_loop(0, config.num_devices - 1, body, carry)
  dkv, dq = grads(config.num_devices - 1, kv, dkv, dq)
  dk, dv = _rotate(dkv, config) if config.num_devices > 1 else dkv
  return (jnp.stack(dq).astype(q.dtype), jnp.stack(dk).astype(k.dtype),
          jnp.stack(dv).astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------
# Public op.


def _check_window(op, local_window_size):
  if local_window_size is None:
    return None
  try:
    return masks_lib.window_sizes(local_window_size)
  except ValueError as e:
    raise ValueError(f"{op}: {e}") from None


def ring_attention(query, key, value, *, axis_name, is_causal=False, segment_ids=None,
                   local_window_size=None, scale=None, logits_soft_cap=None,
                   implementation=None, return_lse=False, block_q=None, block_k=None,
                   block_q_bwd=None, block_k_bwd=None):
  """Exact attention over a sequence split across ``axis_name``; call inside ``shard_map``.

  Args:
    query: the local block [batch, local_len, num_heads, head_dim] of a sequence whose
      dimension 1 is split contiguously over ``axis_name`` (device p holds tokens
      [p * local_len, (p + 1) * local_len)).
    key, value: the local blocks [batch, local_len, num_kv_heads, head_dim]; num_heads must
      be a multiple of num_kv_heads. They travel with their own heads (never repeated).
    axis_name: the mesh axis (or tuple of axes) the sequence is split over.
    is_causal: causal mask over GLOBAL positions.
    segment_ids: int [batch, local_len] (the local block of the global segment ids), or a
      pair (q_segment_ids, kv_segment_ids) of local blocks. The kv ids travel with K/V.
    local_window_size: sliding window over global positions, int w or (left, right), as in
      :func:`pallas_kernels.flash_attention`.
    scale: logit scale, default head_dim ** -0.5.
    logits_soft_cap: if set, logits -> cap * tanh(logits / cap) (Gemma 2), as in
      :func:`pallas_kernels.flash_attention`.
    implementation: None, "pallas", "interpret", "xla" (the per-block kernels) or
      "reference" (all-gather K/V and the naive math; no soft cap).
    return_lse: also return the global log-sum-exp [batch, local_len, num_heads] (float32).
    block_q, block_k, block_q_bwd, block_k_bwd: block sizes of the per-pair flash kernels.

  Returns:
    [batch, local_len, num_heads, head_dim] in query's dtype (and the lse when asked).
  """
  return _ring_attention(
      query, key, value, axis_name=axis_name, layout="contiguous", is_causal=is_causal,
      segment_ids=segment_ids, local_window_size=local_window_size, scale=scale,
      logits_soft_cap=logits_soft_cap, implementation=implementation, return_lse=return_lse,
      blocks=dict(block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                  block_k_bwd=block_k_bwd), op=OP)


def _ring_attention(query, key, value, *, axis_name, layout, is_causal, segment_ids,
                    local_window_size, scale, implementation, return_lse, blocks, op,
                    logits_soft_cap=None):
  flash_ops.validate_inputs(query, key, value, scale, logits_soft_cap, op=op)
  b, tl, h, d = query.shape
  if key.shape[1] != tl:
    raise ValueError(f"{op}: query and key/value must hold the same number of local tokens "
                     f"(self-attention over one sharded sequence), got query "
                     f"{tuple(query.shape)} and key {tuple(key.shape)}.")
  num_devices = axis_size(op, axis_name)
  window = _check_window(op, local_window_size)
  mask = flash_ops.build_mask(h, is_causal, window, 0, None, None, None, op=op)
  q_seg, kv_seg = flash_ops.split_segments(segment_ids, b, tl, tl, op=op)
  platform = dispatch.platform_of(query, key, value)
  impl = dispatch.resolve_implementation(op, implementation, platform)
  scale = float(d ** -0.5 if scale is None else scale)
  if layout == "zigzag" and tl % 2:
    raise ValueError(f"{op}: the zigzag layout needs an even number of local tokens (two "
                     f"chunks per device), got local_len={tl}.")

  if impl == "reference":
    if layout != "contiguous" or logits_soft_cap is not None:
      raise ValueError(f"{op}: implementation='reference' supports the contiguous layout "
                       f"without logits_soft_cap only, got layout {layout!r} and "
                       f"logits_soft_cap={logits_soft_cap!r}.")
    from pallas_kernels.ring_attention.reference import ring_attention_reference
    return ring_attention_reference(
        query, key, value, axis_name=axis_name, is_causal=is_causal,
        segment_ids=None if q_seg is None else (q_seg, kv_seg),
        local_window_size=window, scale=scale, return_lse=return_lse)

  if tl == 0 or b == 0 or d == 0 or h == 0:
    out = jnp.zeros(query.shape, query.dtype)
    lse = jnp.full((b, tl, h), -jnp.inf, jnp.float32)
    return (out, lse) if return_lse else out

  n, c, pairs, table = chunk_geometry(layout, num_devices, tl, mask, is_causal, window)
  backend = "xla" if impl == "xla" else dispatch.pallas_backend(platform)
  spec = backend_spec(backend)
  sizes = flash_ops.block_sizes(spec, c, c, blocks, mask, op=op)
  c_pad = c
  if spec.layout == "bhtd":
    c_pad = flash_ops.padded_length(c, *sizes.values())

  def to_kernel_layout(x):  # [B, n*c, H, D] -> [n, B, H, c_pad, d_pad] or [n, B, c, H, D]
    x = jnp.moveaxis(x.reshape(b, n, c, x.shape[2], d), 1, 0)
    return jax.vmap(lambda x: flash_ops.to_kernel_layout(x, spec, c_pad))(x)

  def seg_layout(s):
    if s is None:
      return None
    return flash_ops.pad_segments(s.reshape(b * n, c), c_pad).reshape(b, n, c_pad).transpose(
        1, 0, 2)

  config = _RingConfig(
      axis_name=axis_name, num_devices=num_devices, num_chunks=n, chunk_len=c, pairs=pairs,
      table=table, backend=backend, scale=scale,
      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      interpret=(impl == "interpret"), **sizes)
  out, lse = _ring(to_kernel_layout(query), to_kernel_layout(key), to_kernel_layout(value),
                   seg_layout(q_seg), seg_layout(kv_seg), config)
  if spec.layout == "bhtd":
    out = out[..., :c, :d].transpose(0, 1, 3, 2, 4)  # [n, B, c, H, D]
  out = jnp.moveaxis(out, 0, 1).reshape(b, tl, h, d)
  if not return_lse:
    return out
  return out, lse[..., :c].transpose(1, 0, 3, 2).reshape(b, tl, h)
