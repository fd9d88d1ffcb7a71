"""Public flash-attention op: validation, dispatch on ``implementation``, custom VJP.

The backends (``xla.py``, ``tpu.py``, ``gpu.py``) share one module interface and work on
[batch, heads, len, head_dim] arrays padded to whole blocks; this module transposes, pads,
calls them under a ``jax.custom_vjp`` and slices the padding off again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch, padding, validation
from pallas_kernels._common import masks as masks_lib
from pallas_kernels.flash_attention import masking
from pallas_kernels.flash_attention.reference import flash_attention_reference

OP = "flash_attention"
LAYOUT_Q = "[batch, q_len, num_heads, head_dim]"
LAYOUT_KV = "[batch, kv_len, num_kv_heads, head_dim]"


def _backend_module(name: str) -> ModuleType:
  return dispatch.backend_module(__package__, name)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call; hashable, so it rides as a nondiff argument."""
  backend: str
  scale: float
  mask: masks_lib.Mask
  logits_soft_cap: float | None
  q_offset: int
  kv_len: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  interpret: bool

  def kernel_kwargs(self, backward: bool) -> dict:
    return dict(
        scale=self.scale, mask=self.mask, logits_soft_cap=self.logits_soft_cap,
        q_offset=self.q_offset, kv_len=self.kv_len,
        block_q=self.block_q_bwd if backward else self.block_q,
        block_k=self.block_k_bwd if backward else self.block_k, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, config: _Config):
  return _backend_module(config.backend).flash_forward(
      q, k, v, q_seg, kv_seg, **config.kernel_kwargs(backward=False))


def _flash_fwd(q, k, v, q_seg, kv_seg, config):
  out, lse = _flash(q, k, v, q_seg, kv_seg, config)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(config, residuals, cotangents):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = _backend_module(config.backend).flash_backward(
      q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse=d_lse,
      **config.kernel_kwargs(backward=True))
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _split_segments(segment_ids, batch, q_len, kv_len, op=OP):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"{op}: segment_ids must be one array or a pair (q_segment_ids, "
                       f"kv_segment_ids), got a sequence of {len(segment_ids)}.")
    q_seg, kv_seg = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(
          f"{op}: a single segment_ids array needs q_len == kv_len, got q_len={q_len}, "
          f"kv_len={kv_len}; pass a pair (q_segment_ids [batch, q_len], kv_segment_ids "
          "[batch, kv_len]) instead.")
    q_seg = kv_seg = segment_ids
  for name, seg, length in (("q_segment_ids", q_seg, q_len), ("kv_segment_ids", kv_seg, kv_len)):
    validation.check_rank(op, name, seg, 2, "[batch, len]")
    validation.check_int_dtype(op, name, seg)
    validation.check_shape(op, name, seg, (batch, length), "[batch, len]")
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _validate(query, key, value, scale, logits_soft_cap, op=OP):
  validation.check_rank(op, "query", query, 4, LAYOUT_Q)
  validation.check_rank(op, "key", key, 4, LAYOUT_KV)
  validation.check_rank(op, "value", value, 4, LAYOUT_KV)
  for name, x in (("query", query), ("key", key), ("value", value)):
    validation.check_float_dtype(op, name, x)
  validation.check_same_dtype(op, ("query", "key", "value"), (query, key, value))
  b, _, h, d = query.shape
  if key.shape[0] != b or key.shape[3] != d:
    raise ValueError(f"{op}: key must be {LAYOUT_KV} with batch={b} and head_dim={d} like "
                     f"query {tuple(query.shape)}, got {tuple(key.shape)}.")
  validation.check_shape(op, "value", value, key.shape, f"{LAYOUT_KV} (the shape of key)")
  hk = key.shape[2]
  if hk == 0 or h % hk:
    raise ValueError(f"{op}: num_heads ({h}, from query {tuple(query.shape)}) must be a "
                     f"multiple of num_kv_heads ({hk}, from key {tuple(key.shape)}).")
  validation.check_positive_float(op, "scale", scale, allow_none=True)
  validation.check_positive_float(op, "logits_soft_cap", logits_soft_cap, allow_none=True)


def _build_mask(num_heads, is_causal, local_window_size, num_sink_tokens, chunk_size,
                global_tokens, mask, op=OP):
  """The call's mask keywords as one validated :class:`masks.Mask`."""
  try:
    return masks_lib.make_mask(
        is_causal=bool(is_causal), local_window_size=local_window_size,
        num_sink_tokens=num_sink_tokens, chunk_size=chunk_size,
        global_tokens=None if global_tokens is None else tuple(global_tokens), mask=mask,
        num_heads=num_heads)
  except ValueError as e:
    raise ValueError(f"{op}: {e}") from None


def _block_sizes(module, platform_min, q_len, kv_len, blocks, mask, op=OP):
  """Requested (or default) block sizes, shrunk for short inputs, validated.

  A backend whose blocks must be powers of two says so with ``POWER_OF_TWO_BLOCKS``; one
  with ``default_block_size(mask, q_len, kv_len)`` picks its default from the mask.
  """
  defaults = module.DEFAULT_BLOCK_SIZES
  if hasattr(module, "default_block_size") and all(b is None for b in blocks.values()):
    defaults = dict.fromkeys(defaults, module.default_block_size(mask, q_len, kv_len))
  sizes = {}
  for name, requested in blocks.items():
    size = defaults[name] if requested is None else requested
    validation.check_positive_int(op, name, size)
    if size % platform_min:
      raise ValueError(f"{op}: {name} must be a multiple of {platform_min} for this "
                       f"implementation, got {size}.")
    length = padding.round_up(q_len if name.startswith("block_q") else kv_len, platform_min)
    if getattr(module, "POWER_OF_TWO_BLOCKS", False):
      if size & (size - 1):
        raise ValueError(f"{op}: {name} must be a power of two for this implementation, "
                         f"got {size}.")
      length = padding.next_power_of_2(length)
    sizes[name] = min(size, length)
  return sizes


def flash_attention(query, key, value, *, scale=None, is_causal=False, segment_ids=None,
                    local_window_size=None, num_sink_tokens=0, chunk_size=None,
                    global_tokens=None, mask=None, logits_soft_cap=None, return_lse=False,
                    implementation=None, block_q=None, block_k=None, block_q_bwd=None,
                    block_k_bwd=None):
  """Memory-efficient exact attention (FlashAttention-2) with GQA, segments and sparse masks.

  Work scales with the visible area: blocks the mask hides are skipped in the forward and
  the backward pass, by every implementation.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads must be a multiple of
      num_kv_heads (MHA, GQA, MQA). K/V are never repeated in memory.
    scale: logit scale; default head_dim ** -0.5.
    is_causal: causal mask. With q_len < kv_len queries are aligned to the END of the keys:
      query i sits at position kv_len - q_len + i (decoding, chunked prefill).
    segment_ids: int [batch, len] for self-attention, or a pair (q_segment_ids [batch, q_len],
      kv_segment_ids [batch, kv_len]); a token sees only keys of its own segment.
    local_window_size: sliding window, an int w or a pair (left, right) with the semantics
      of ``jax.nn.dot_product_attention``: the query at position c sees keys c - left ...
      c + right (w means (w, w)); with is_causal the right side is cut at c.
    num_sink_tokens: the first keys stay visible to every query whatever the window (still
      subject to causality, chunks and segments). Needs ``local_window_size``.
    chunk_size: attention only inside aligned chunks of this many positions (causal inside
      a chunk when is_causal).
    global_tokens: positions that see every key and are seen by every query (bidirectional
      attention only).
    mask: a :class:`pallas_kernels.masks.Mask`, ANDed with the above; a
      :class:`~pallas_kernels.masks.PerHeadMask` gives each query head its own mask
      (DuoAttention retrieval/streaming heads, multi-scale windows, S²-Attn).
    logits_soft_cap: logits become cap * tanh(logits / cap) after scaling (Gemma 2).
    return_lse: also return the log-sum-exp of the visible logits [batch, q_len, num_heads]
      (float32, -inf where a query sees no key); it is differentiable.
    implementation: None (compiled Pallas on TPU/GPU, "xla" elsewhere), "pallas",
      "interpret", "xla" or "reference".
    block_q, block_k: forward block sizes; block_q_bwd, block_k_bwd: backward block sizes.
      None takes the per-platform default. Lengths need not be multiples: inputs are padded.

  Returns:
    [batch, q_len, num_heads, head_dim] in query's dtype (and the lse if asked). A query that
    sees no key gets zeros, and zero gradients.
  """
  _validate(query, key, value, scale, logits_soft_cap)
  b, tq, h, d = query.shape
  tk, hk = key.shape[1], key.shape[2]
  mask = _build_mask(h, is_causal, local_window_size, num_sink_tokens, chunk_size,
                     global_tokens, mask)
  q_seg, kv_seg = _split_segments(segment_ids, b, tq, tk)
  platform = dispatch.platform_of(query, key, value)
  impl = dispatch.resolve_implementation(OP, implementation, platform)
  scale = float(d ** -0.5 if scale is None else scale)
  soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)

  if impl == "reference":
    return flash_attention_reference(
        query, key, value, scale=scale, mask=mask, segment_ids=(
            None if q_seg is None else (q_seg, kv_seg)),
        logits_soft_cap=soft_cap, return_lse=return_lse)

  if tq == 0 or tk == 0 or b == 0 or d == 0:
    out = jnp.zeros(query.shape, query.dtype)
    lse = jnp.full((b, tq, h), -jnp.inf, jnp.float32)
    return (out, lse) if return_lse else out

  backend = "xla" if impl == "xla" else dispatch.pallas_backend(platform)
  module = _backend_module(backend)
  blocks = _block_sizes(module, module.MIN_BLOCK, tq, tk, dict(
      block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd),
      mask)
  tq_pad = padding.round_up(tq, math.lcm(blocks["block_q"], blocks["block_q_bwd"]))
  tk_pad = padding.round_up(tk, math.lcm(blocks["block_k"], blocks["block_k_bwd"]))
  d_pad = module.padded_head_dim(d)

  def to_kernel_layout(x, length):
    x = jnp.transpose(x, (0, 2, 1, 3))
    return padding.pad_axis(padding.pad_axis(x, 2, length), 3, d_pad)

  q = to_kernel_layout(query, tq_pad)
  k = to_kernel_layout(key, tk_pad)
  v = to_kernel_layout(value, tk_pad)
  if q_seg is not None:
    # Edge padding keeps per-block segment ranges tight; padded keys are masked by kv_len.
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tq_pad - tq)), mode="edge")
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, tk_pad - tk)), mode="edge")

  config = _Config(
      backend=backend, scale=scale, mask=mask, logits_soft_cap=soft_cap,
      q_offset=masking.causal_offset(tq, tk), kv_len=tk, interpret=(impl == "interpret"),
      **blocks)
  out, lse = _flash(q, k, v, q_seg, kv_seg, config)
  out = jnp.transpose(out[:, :, :tq, :d], (0, 2, 1, 3))
  if not return_lse:
    return out
  return out, jnp.transpose(lse[:, :, :tq], (0, 2, 1))
