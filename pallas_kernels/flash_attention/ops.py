"""Public flash-attention op: validation, dispatch on ``implementation``, custom VJP.

The user's layout is query [B, Tq, H, D], key/value [B, Tk, Hkv, D]. Each backend states in
its :class:`~pallas_kernels.flash_attention.backends.BackendSpec` the layout it takes:

* ``"bhtd"`` backends (``xla.py``, ``tpu.py``) get [B, H, T, Dp] arrays that this module
  transposes and pads to whole blocks (and head_dim to ``padded_head_dim``), and slices back;
* ``"bthd"`` backends (``gpu.py``, Triton; ``mosaic_gpu.py``, Hopper) get the user's arrays
  untouched: the residuals of the custom VJP are the user's own arrays. The Triton kernels
  mask length tails and head_dim padding; the Mosaic-GPU kernels pad lengths that are not
  whole blocks inside their module (they run only for head_dim 64 or 128).

Internal API (for ring attention and context parallelism; documented, stable within lclm):
:func:`validate_inputs`, :func:`build_mask`, :func:`split_segments`, :func:`block_sizes`,
:func:`padded_length`, :func:`backend_spec`, :func:`to_kernel_layout`,
:func:`from_kernel_layout`, :func:`pad_segments`, :class:`FlashConfig`, :func:`flash_core` and
:func:`attend` (the whole op on resolved static arguments).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch, padding, validation
from pallas_kernels._common import masks as masks_lib
from pallas_kernels.flash_attention import masking
from pallas_kernels.flash_attention.backends import BLOCK_NAMES, BackendSpec, backend_spec
from pallas_kernels.flash_attention.reference import flash_attention_reference

OP = "flash_attention"
GPU_KERNELS_ENV = "LCLM_FLASH_GPU_KERNELS"
LAYOUT_Q = "[batch, q_len, num_heads, head_dim]"
LAYOUT_KV = "[batch, kv_len, num_kv_heads, head_dim]"

__all__ = ["BackendSpec", "FlashConfig", "attend", "backend_spec", "block_sizes",
           "build_mask", "flash_attention", "flash_core", "from_kernel_layout", "pad_segments",
           "padded_length", "split_segments", "to_kernel_layout", "validate_inputs"]


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Everything static about one call; hashable, so it rides as a nondiff argument.

  ``q_len`` is the true query length (None: the whole, possibly padded, query array); with
  it, query blocks made only of padding are skipped by backends that take ``q_len``.
  ``out_dtype`` / ``grad_dtype`` (None: the input dtypes) ask for float32 partials.
  """
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
  q_len: int | None = None
  out_dtype: object = None
  grad_dtype: object = None

  @property
  def spec(self) -> BackendSpec:
    return backend_spec(self.backend)

  def kernel_kwargs(self, backward: bool, q_len: int | None = None) -> dict:
    """Keywords of the backend's flash_forward (``backward=False``) or flash_backward."""
    kw = dict(
        scale=self.scale, mask=self.mask, logits_soft_cap=self.logits_soft_cap,
        q_offset=self.q_offset, kv_len=self.kv_len,
        block_q=self.block_q_bwd if backward else self.block_q,
        block_k=self.block_k_bwd if backward else self.block_k, interpret=self.interpret)
    q_len = self.q_len if self.q_len is not None else q_len
    if backward:
      kw.update(self.spec.backward_kwargs(q_len=q_len, grad_dtype=self.grad_dtype))
    else:
      kw.update(self.spec.forward_kwargs(q_len=q_len, out_dtype=self.out_dtype))
    return kw


def _query_len(q, spec):
  return q.shape[1] if spec.layout == "bthd" else q.shape[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def flash_core(q, k, v, q_seg, kv_seg, config: FlashConfig):
  """The differentiable kernel call, on arrays already in the backend's layout.

  Args:
    q, k, v: in ``config.spec.layout`` (see the module docstring); for ``"bhtd"`` padded to
      whole blocks of both passes.
    q_seg, kv_seg: int32 [B, Tq], [B, Tk] (padded like q, k for ``"bhtd"``), or None.

  Returns:
    out (q's layout, ``config.out_dtype`` or q.dtype) and lse [B, H, Tq] float32.
  """
  return config.spec.module.flash_forward(
      q, k, v, q_seg, kv_seg, **config.kernel_kwargs(False, _query_len(q, config.spec)))


def _flash_fwd(q, k, v, q_seg, kv_seg, config):
  out, lse = flash_core(q, k, v, q_seg, kv_seg, config)
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(config, residuals, cotangents):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = config.spec.module.flash_backward(
      q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse=d_lse,
      **config.kernel_kwargs(True, _query_len(q, config.spec)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


flash_core.defvjp(_flash_fwd, _flash_bwd)


def split_segments(segment_ids, batch, q_len, kv_len, op=OP):
  """Validated (q_segment_ids, kv_segment_ids), int32 [batch, q_len] and [batch, kv_len].

  ``segment_ids`` is None, one [batch, len] array (self-attention) or a pair.
  """
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
  return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def validate_inputs(query, key, value, scale, logits_soft_cap, op=OP):
  """Raises a ValueError naming the argument for bad ranks, dtypes, shapes, scale, cap."""
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


def build_mask(num_heads, is_causal, local_window_size, num_sink_tokens, chunk_size,
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


def _fit_pair(sizes, fwd_name, bwd_name, shrunk, given):
  """Makes the smaller block of a (forward, backward) pair divide the larger one when one of
  them was shrunk for a short input, so that one padded length serves both passes. Only a
  default block changes: a block the caller gave stays as given."""
  a, b = sizes[fwd_name], sizes[bwd_name]
  if max(a, b) % min(a, b) == 0 or not (shrunk[fwd_name] or shrunk[bwd_name]):
    return
  smaller = bwd_name if a >= b else fwd_name
  if not given[smaller]:
    sizes[smaller] = math.gcd(a, b)  # A multiple of min_block: both sizes are.


def block_sizes(spec: BackendSpec, q_len, kv_len, blocks, mask, op=OP):
  """Requested (or default) block sizes, shrunk for short inputs, validated.

  Args:
    spec: the backend's spec (its minimum block, defaults, power-of-two rule).
    q_len, kv_len: true lengths.
    blocks: {block_q, block_k, block_q_bwd, block_k_bwd} -> int or None (the default).
    mask: the call's mask (a backend may pick its default block size from it).

  Returns:
    {name: size}. A block larger than its (rounded) length shrinks to that length; when that
    happens and the smaller block of the axis is a default, it becomes their gcd so that it
    divides the larger, and ``padded_length`` pads to the larger only (300 queries with the
    TPU defaults 512/256 -> blocks 384/128, 384 rows instead of lcm(384, 256) = 768). Blocks
    the caller gave are kept (lcm padding then; all-padding query blocks cost no work).
  """
  defaults = dict(spec.default_block_sizes)
  if spec.default_block_size is not None and all(blocks.get(n) is None for n in BLOCK_NAMES):
    defaults = dict.fromkeys(BLOCK_NAMES, spec.default_block_size(mask, q_len, kv_len))
  sizes, shrunk = {}, {}
  given = {name: blocks.get(name) is not None for name in BLOCK_NAMES}
  for name in BLOCK_NAMES:
    requested = blocks.get(name)
    size = defaults[name] if requested is None else requested
    validation.check_positive_int(op, name, size)
    if size % spec.min_block:
      raise ValueError(f"{op}: {name} must be a multiple of {spec.min_block} for this "
                       f"implementation, got {size}.")
    length = padding.round_up(q_len if name.startswith("block_q") else kv_len, spec.min_block)
    if spec.power_of_two_blocks:
      if size & (size - 1):
        raise ValueError(f"{op}: {name} must be a power of two for this implementation, "
                         f"got {size}.")
      length = padding.next_power_of_2(length)
    sizes[name] = min(size, length)
    shrunk[name] = size > length
  _fit_pair(sizes, "block_q", "block_q_bwd", shrunk, given)
  _fit_pair(sizes, "block_k", "block_k_bwd", shrunk, given)
  return sizes


def padded_length(length: int, *blocks: int) -> int:
  """``length`` rounded up to whole blocks of every one of ``blocks`` (their lcm)."""
  return padding.round_up(length, math.lcm(*blocks))


def to_kernel_layout(x, spec: BackendSpec, length: int):
  """[B, T, H, D] -> the backend's layout: for ``"bhtd"`` transposed and zero padded to
  ``length`` rows and ``spec.padded_head_dim(D)``; for ``"bthd"`` ``x`` itself."""
  if spec.layout == "bthd":
    return x
  x = jnp.transpose(x, (0, 2, 1, 3))
  return padding.pad_axis(padding.pad_axis(x, 2, length), 3, spec.padded_head_dim(x.shape[3]))


def from_kernel_layout(out, lse, spec: BackendSpec, length: int, head_dim: int):
  """Backend outputs (out in its layout, lse [B, H, Tp]) -> out [B, T, H, D], lse [B, T, H]."""
  if spec.layout == "bhtd":
    out = jnp.transpose(out[:, :, :length, :head_dim], (0, 2, 1, 3))
  return out, jnp.transpose(lse[:, :, :length], (0, 2, 1))


def pad_segments(seg, length: int):
  """Edge-pads int32 [B, T] segment ids to ``length`` (keeps per-block ranges tight; padded
  keys are masked by kv_len, padded queries are discarded)."""
  if seg is None or seg.shape[1] == length:
    return seg
  return jnp.pad(seg, ((0, 0), (0, length - seg.shape[1])), mode="edge")


def attend(query, key, value, q_seg, kv_seg, *, backend: str, scale: float, mask, soft_cap,
           q_offset: int, blocks: dict, interpret: bool):
  """Flash attention on validated arguments: [B, Tq, H, D] in, (out, lse [B, Tq, H]) out.

  Pads and transposes for ``"bhtd"`` backends only; ``q_offset`` is the position of query 0
  relative to key 0 (``masking.causal_offset`` for end-aligned queries); all keys are real
  (kv_len = key.shape[1]). Differentiable in query, key, value.
  """
  spec = backend_spec(backend)
  tq, tk, d = query.shape[1], key.shape[1], query.shape[3]
  tq_pad = tk_pad = None
  if spec.layout == "bhtd":
    tq_pad = padded_length(tq, blocks["block_q"], blocks["block_q_bwd"])
    tk_pad = padded_length(tk, blocks["block_k"], blocks["block_k_bwd"])
    q_seg, kv_seg = pad_segments(q_seg, tq_pad), pad_segments(kv_seg, tk_pad)
  config = FlashConfig(
      backend=backend, scale=scale, mask=mask, logits_soft_cap=soft_cap, q_offset=q_offset,
      kv_len=tk, interpret=interpret, q_len=tq, **blocks)
  out, lse = flash_core(to_kernel_layout(query, spec, tq_pad),
                        to_kernel_layout(key, spec, tk_pad),
                        to_kernel_layout(value, spec, tk_pad), q_seg, kv_seg, config)
  return from_kernel_layout(out, lse, spec, tq, d)


def _use_mosaic_gpu(query, *, mask, soft_cap, has_segments, blocks) -> bool:
  """Whether a compiled GPU call runs the Mosaic-GPU kernels (``mosaic_gpu.py``) rather than
  Triton's: on a Hopper GPU (sm90), for what those kernels support (16-bit inputs, head_dim
  64 or 128, full or causal masks, no segments, blocks multiples of 64); Triton otherwise.
  ``LCLM_FLASH_GPU_KERNELS=triton`` keeps Triton everywhere (``mosaic_gpu`` or ``auto``: the
  rule above)."""
  choice = os.environ.get(GPU_KERNELS_ENV, "auto")
  if choice not in ("auto", "triton", "mosaic_gpu"):
    raise ValueError(f"{OP}: {GPU_KERNELS_ENV} must be 'auto', 'triton' or 'mosaic_gpu', "
                     f"got {choice!r}.")
  if choice == "triton" or jax.default_backend() != "gpu" or dispatch.target_platform_active():
    return False  # Ahead-of-time lowering on another host keeps Triton.
  from pallas_kernels.flash_attention import mosaic_gpu  # pylint: disable=import-outside-toplevel
  if not mosaic_gpu.is_supported_device(jax.devices()[0]):
    return False
  if any(b is not None and b % mosaic_gpu.MIN_BLOCK for b in blocks.values()):
    return False
  if query.shape[3] not in mosaic_gpu.HEAD_DIMS:  # Others would be padded in HBM.
    return False
  return mosaic_gpu.unsupported_reason(
      mask=mask, logits_soft_cap=soft_cap, has_segments=has_segments, dtype=query.dtype,
      head_dim=query.shape[3]) is None


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
      "interpret", "xla" or "reference". On a Hopper GPU (H100/H200) compiled calls with
      bf16/f16 inputs, head_dim 64 or 128, a full or causal mask, no segments and block
      sizes (if given) multiples of 64 run the Mosaic-GPU kernels (TMA, warpgroup MMA);
      everything else, or everything with ``LCLM_FLASH_GPU_KERNELS=triton``, runs the Triton
      kernels.
    block_q, block_k: forward block sizes; block_q_bwd, block_k_bwd: backward block sizes.
      None takes the per-platform default. Lengths need not be multiples: the TPU and XLA
      paths pad internally, the GPU kernels mask the tails.

  Returns:
    [batch, q_len, num_heads, head_dim] in query's dtype (and the lse if asked). A query that
    sees no key gets zeros, and zero gradients.
  """
  validate_inputs(query, key, value, scale, logits_soft_cap)
  b, tq, h, d = query.shape
  tk = key.shape[1]
  mask = build_mask(h, is_causal, local_window_size, num_sink_tokens, chunk_size,
                    global_tokens, mask)
  q_seg, kv_seg = split_segments(segment_ids, b, tq, tk)
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

  requested = dict(block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                   block_k_bwd=block_k_bwd)
  backend = "xla" if impl == "xla" else dispatch.pallas_backend(platform)
  if backend == "gpu" and impl == "pallas" and _use_mosaic_gpu(
      query, mask=mask, soft_cap=soft_cap, has_segments=q_seg is not None, blocks=requested):
    backend = "mosaic_gpu"
  blocks = block_sizes(backend_spec(backend), tq, tk, requested, mask)
  out, lse = attend(query, key, value, q_seg, kv_seg, backend=backend, scale=scale, mask=mask,
                    soft_cap=soft_cap, q_offset=masking.causal_offset(tq, tk), blocks=blocks,
                    interpret=(impl == "interpret"))
  return (out, lse) if return_lse else out
