"""Multi-head self-attention (MHA, GQA, MQA) on the flash-attention kernel, with sparse masks."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from layers import attention_cache, compensation, kv_policies, kv_retrieval
from layers.attention_cache import AttentionCache
from layers.norms import RMSNorm
from layers.partitioning import (ContextParallelism, context_parallelism, shard_kernel,
                                 with_logical_axes)
from layers.position_extensions import PositionExtension, attend_passes, merge_attention
from layers.rotary import RotaryEmbedding
from pallas_kernels import decode_attention, flash_attention, masks
from pallas_kernels.flash_attention.reference import masked_softmax_attention
from pallas_kernels.ring_attention import context_parallel_shard


# Logical axes of the kernel's operands. Query heads take the key/value heads' name: a split
# of the kv heads into contiguous blocks carries exactly the query heads of their groups.
_QUERY_AXES = ("batch", None, "kv_heads", None)
_KV_AXES = ("batch", None, "kv_heads", None)
_HEAD_IDS_AXES = ("kv_heads",)
# Under context parallelism the kernel gets sequence shards too ("length" over "context").
_CONTEXT_PARALLEL_AXES = ("batch", "length", "kv_heads", None)
# Queries per block of the exact XLA path that attends a prefill chunk to a decode cache.
_DENSE_QUERY_BLOCK = 256
# Name under which a layer with ``capture_qk`` set sows the (q, k) its kernel sees.
CAPTURED_QK = "attention_qk"


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _shifted_sparse_mask(num_heads: int, group_size: int, is_causal: bool) -> masks.PerHeadMask:
  """LongLoRA's S²-Attn: groups of ``group_size`` tokens, the second half of the heads shifted
  by half a group (causal inside each group when ``is_causal``)."""
  if is_causal:
    return masks.shifted_sparse_mask(num_heads, group_size)
  masks.shifted_sparse_mask(num_heads, group_size)  # Same validation as the causal variant.
  plain, shifted = masks.ChunkedMask(group_size), masks.ChunkedMask(group_size, group_size // 2)
  return masks.PerHeadMask((plain,) * (num_heads // 2) + (shifted,) * (num_heads // 2))


def _union_length(intervals, start: int, stop: int) -> int:
  """Number of integers of [start, stop) covered by the half-open ``intervals``."""
  clipped = sorted((max(int(lo), start), min(int(hi), stop)) for lo, hi in intervals)
  covered, end = 0, start
  for lo, hi in clipped:
    lo = max(lo, end)
    if hi > lo:
      covered += hi - lo
      end = hi
  return covered


class Attention(nnx.Module):
  """Self-attention with grouped key/value heads, optional QK-norm, RoPE and sparse masks.

  ``num_kv_heads == num_heads`` is multi-head attention, ``1`` is multi-query attention and
  anything in between that divides ``num_heads`` is grouped-query attention: query head
  ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``.

  Per call: projections q [features -> num_heads x head_dim] and k, v
  [features -> num_kv_heads x head_dim] (bias-free unless ``qkv_bias``); with
  ``use_qk_norm`` an :class:`RMSNorm` over head_dim (one scale shared by all heads) on q and
  on k; RoPE on q and k unless ``rope_theta`` is None (NoPE), with the options of
  :class:`layers.rotary.RotaryEmbedding` (scaling, per-head bases, partial rotary, layout);
  :func:`pallas_kernels.flash_attention` with scale ``attention_scale`` (default
  ``head_dim ** -0.5``); the output projection [num_heads x head_dim -> features] (bias-free
  unless ``output_bias``).

  Training-free length extension (``position_extension``): Self-Extend or LM-Infinite
  replace the single kernel call by their two flash passes merged through the log-sum-exp
  (:mod:`layers.position_extensions`); they need RoPE, causality and no other sparse option.

  Sparse attention: the mask options go to the kernel, which skips the blocks they hide.
  Visible = causal & (window | sinks) & chunk & ``mask`` [& S²-Attn while training].

  Context parallelism: while the training code has installed a plan
  (``layers.partitioning.context_parallelism()``: the mesh splits the sequence), the kernel
  runs on sequence shards (:func:`pallas_kernels.ring_attention.context_parallel_shard`:
  ring, all-gather or Ulysses). It supports causality, a window, segments, GQA and the soft
  cap; sinks, chunks, ``mask``, S²-Attn and position extensions raise a ValueError.

  Logical axes of the kernels: q ("embed", "heads", "head_dim"), k and v ("embed",
  "kv_heads", "head_dim"), o ("heads", "head_dim", "embed"); biases drop the "embed" axis of
  their kernel; QK-norm scales ("head_dim",).

  Probing (off by default, never set in training): with the attribute ``capture_qk = True``
  a call over a whole sequence (no cache) running under ``nnx.capture(..., nnx.Intermediate)``
  sows ``(q, k)`` under the name :data:`CAPTURED_QK`: q [batch, seq, num_heads, head_dim] and
  k [batch, seq, num_kv_heads, head_dim], in the computation dtype, exactly what the kernel
  gets (QK-norm, ``attention_scale`` and RoPE applied; the kernel multiplies the logits by
  ``head_dim ** -0.5``, then the soft cap; with a position extension, its first pass). Used by
  :mod:`lclm.evals.retrieval_heads`; outside a capture nothing is sown.

  Args:
    features: model dimension of the input and output.
    num_heads: number of query heads.
    num_kv_heads: number of key/value heads; default ``num_heads``.
    head_dim: size of each head; default ``features // num_heads``.
    use_qk_norm: RMS-normalise each query and key head vector before RoPE.
    qk_norm_eps: epsilon of the QK-norms.
    qk_norm_scale_offset: ``scale_offset`` of the QK-norms (1.0: Gemma 3's ``1 + weight``).
    qkv_bias: biases on the q, k and v projections (Qwen2; Llama's ``attention_bias``).
    output_bias: a bias on the output projection (Llama's ``attention_bias``).
    attention_scale: the softmax scale of the logits; default ``head_dim ** -0.5`` (Gemma:
      ``query_pre_attn_scalar ** -0.5``). Applied to the queries, so every path (flash,
      decode, cached prefill, soft cap) sees the same logits.
    rope_theta: RoPE base, a list of one base per query head (HARPE; query heads of one
      GQA group must share a base), or None for no position encoding (NoPE).
    rope_scaling: None or a Hugging Face ``rope_scaling`` dict (``rope_type`` linear, ntk,
      dynamic, yarn, longrope, llama3 and the keys it reads; see :mod:`layers.rope`). The
      length-dependent types read ``seq_len = max(position_ids) + 1`` at call time.
    partial_rotary_factor: rotate the first ``int(head_dim * factor)`` coordinates only.
    rope_layout: "half" (rotate-half: GPT-NeoX, Llama) or "interleaved" (GPT-J pairs).
    max_position_embeddings: Hugging Face's ``config.max_position_embeddings``, read by some
      scaling types (see :func:`layers.rope.rope_frequencies`).
    position_extension: None, ``{"method": "self_extend", "group_size": G, "window": W}``
      or ``{"method": "lm_infinite", "local_window": L, "max_distance": M, "num_global":
      S}`` (see :mod:`layers.position_extensions`); position ids must be contiguous within
      each segment.
    is_causal: each token attends only to itself and earlier tokens.
    local_window_size: sliding window with the kernel's (``jax.nn.dot_product_attention``)
      semantics: an int w or a pair (left, right); the query at position c sees keys
      c - left ... c + right, so a causal layer with ``w`` sees ``w + 1`` keys, itself
      included. None: no window.
    num_sink_tokens: the first keys of each row stay visible to every query whatever the
      window (StreamingLLM's attention sinks); needs ``local_window_size``. Positions are
      those of the row: with packed sequences only the first segment has sinks.
    chunk_size: attention only inside aligned chunks of this many positions.
    mask: a :class:`pallas_kernels.masks.Mask` ANDed with the above, shared by all heads or
      a :class:`~pallas_kernels.masks.PerHeadMask` with one entry per query head (e.g.
      ``masks.per_head_windows([...])`` for DuoAttention's retrieval/streaming heads).
    shifted_sparse_group_size: LongLoRA's shifted sparse attention (S²-Attn), a
      **training-time** approximation: attention inside groups of this many tokens, the
      second half of the heads on groups shifted by half a group (ANDed with the rest of
      the mask). It applies only while ``deterministic`` is False; ``model.eval()`` (or
      ``deterministic=True``) gives the full (causal) attention that inference uses, and
      :meth:`kv_cache_tokens` ignores it. Needs an even ``num_heads`` and an even group.
    deterministic: evaluation mode (flax's train/eval switch: ``module.eval()`` sets it);
      only S²-Attn depends on it.
    logits_soft_cap: if set, logits -> cap * tanh(logits / cap).
    cache_policy: None (the exact cache), or a KV-cache policy for decoding, a dict such as
      ``{"name": "h2o", "budget": 256}``: an eviction policy (:mod:`layers.kv_policies`:
      StreamingLLM, H2O, SnapKV, each optionally merging) keeps ``budget`` entries per
      key/value head; a block-retrieval policy (:mod:`layers.kv_retrieval`: Quest, InfLLM)
      keeps every token and lets each decode query (with ``"prefill": "retrieval"``, each
      prefill chunk too) read ``budget`` of them; with ``"memory_distance"`` its cache holds
      keys before RoPE. Full causal attention only (no window, chunks, per-head masks or
      position extension). Training and calls without a cache are unaffected.
    compensation_token: RazorAttention's compensation token (:mod:`layers.compensation`):
      every query of a sliding-window head also attends to one token, the mean key and value
      of the tokens its window hides (its logit + log of their number); in training,
      prefill and decoding alike (a ring cache keeps the sums of what left it). Needs causal
      heads that are full or sinks + window, the query heads of a GQA group sharing one
      shape; packed rows need contiguous segments. Not with cache_policy, a position
      extension, S²-Attn or context parallelism.
    implementation: passed to the kernel: None, "pallas", "interpret", "xla", "reference".
    dtype: computation dtype of the projections; None promotes inputs and parameters.
    param_dtype: dtype of the parameters.
    rngs: randomness for the kernel initialisers.
  """

  def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, use_qk_norm: bool = False,
               qk_norm_eps: float = 1e-6, qk_norm_scale_offset: float = 0.0,
               qkv_bias: bool = False, output_bias: bool = False,
               attention_scale: float | None = None,
               rope_theta: float | Sequence[float] | None = 10000.0,
               rope_scaling: Mapping[str, Any] | None = None,
               partial_rotary_factor: float = 1.0, rope_layout: str = "half",
               max_position_embeddings: int | None = None,
               position_extension: Mapping[str, Any] | None = None, is_causal: bool = True,
               local_window_size: int | Sequence[int] | None = None, num_sink_tokens: int = 0,
               chunk_size: int | None = None, mask: masks.Mask | None = None,
               shifted_sparse_group_size: int | None = None, deterministic: bool = False,
               logits_soft_cap: float | None = None,
               cache_policy: Mapping[str, Any] | None = None, compensation_token: bool = False,
               implementation: str | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0:
      raise ValueError(
          f"Attention: num_heads and num_kv_heads must be positive, got num_heads={num_heads} "
          f"and num_kv_heads={num_kv_heads}."
      )
    if num_heads % num_kv_heads:
      raise ValueError(
          f"Attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}."
      )
    if head_dim is None:
      if features % num_heads:
        raise ValueError(
            f"Attention: features={features} is not divisible by num_heads={num_heads}; "
            "pass head_dim explicitly."
        )
      head_dim = features // num_heads
    if head_dim <= 0:
      raise ValueError(f"Attention: head_dim must be positive, got {head_dim}.")
    if attention_scale is not None and not (isinstance(attention_scale, (int, float)) and
                                            not isinstance(attention_scale, bool) and
                                            attention_scale > 0):
      raise ValueError(f"Attention: attention_scale must be a positive number or None (the "
                       f"default head_dim ** -0.5), got {attention_scale!r}.")
    if rope_theta is not None and head_dim % 2:
      raise ValueError(f"Attention: RoPE needs an even head_dim, got head_dim={head_dim}.")
    if rope_theta is None:
      rope_options = dict(rope_scaling=rope_scaling, position_extension=position_extension)
      if partial_rotary_factor != 1.0:
        rope_options["partial_rotary_factor"] = partial_rotary_factor
      given = sorted(name for name, value in rope_options.items() if value is not None)
      if given:
        raise ValueError(f"Attention: {given} need RoPE, but rope_theta is None (NoPE); set "
                         "rope_theta or drop them.")
      self.rotary = None
    else:
      self.rotary = RotaryEmbedding.create(
          head_dim, rope_theta, num_heads=num_heads, num_kv_heads=num_kv_heads,
          scaling=rope_scaling, partial_rotary_factor=partial_rotary_factor,
          layout=rope_layout, max_position_embeddings=max_position_embeddings)

    self.features = features
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    # Queries are multiplied by this, so that the kernels' head_dim ** -0.5 gives the scale.
    self.query_multiplier = (None if attention_scale is None else
                             float(attention_scale) * head_dim ** 0.5)
    self.rope_theta = tuple(rope_theta) if isinstance(rope_theta, (list, tuple)) else rope_theta
    self.is_causal = is_causal
    self.logits_soft_cap = logits_soft_cap
    self.implementation = implementation
    self.capture_qk = False  # Probing hook (see the class docstring); off in training.
    self.deterministic = deterministic
    self._set_mask_options(local_window_size, num_sink_tokens, chunk_size, mask,
                           shifted_sparse_group_size)
    self._set_position_extension(position_extension)
    self._set_cache_policy(cache_policy)
    self._set_compensation(compensation_token)
    self._check_context_parallelism(context_parallelism())

    def projection(in_features, out_features, axis, logical_axes, use_bias=False):
      kernel_init = with_logical_axes(nnx.initializers.lecun_normal(), logical_axes)
      in_rank = 1 if isinstance(in_features, int) else len(in_features)
      bias_init = with_logical_axes(nnx.initializers.zeros_init(), logical_axes[in_rank:])
      return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias,
                               kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    self.q_proj = projection(features, (num_heads, head_dim), -1,
                             ("embed", "heads", "head_dim"), qkv_bias)
    self.k_proj = projection(features, (num_kv_heads, head_dim), -1,
                             ("embed", "kv_heads", "head_dim"), qkv_bias)
    self.v_proj = projection(features, (num_kv_heads, head_dim), -1,
                             ("embed", "kv_heads", "head_dim"), qkv_bias)
    self.o_proj = projection((num_heads, head_dim), features, (-2, -1),
                             ("heads", "head_dim", "embed"), output_bias)
    if use_qk_norm:
      self.q_norm, self.k_norm = (
          RMSNorm(head_dim, eps=qk_norm_eps, scale_offset=qk_norm_scale_offset,
                  param_dtype=param_dtype, logical_axis="head_dim") for _ in range(2))
    else:
      self.q_norm = self.k_norm = None

  def _set_mask_options(self, local_window_size, num_sink_tokens, chunk_size, mask,
                        shifted_sparse_group_size):
    """Validates the sparse-attention options (at construction, before anything compiles)."""
    if local_window_size is not None:
      try:
        left, right = masks.window_sizes(local_window_size)
      except ValueError as error:
        raise ValueError(f"Attention: {error}") from None
      local_window_size = left if left == right and _is_int(local_window_size) else (left, right)
    if not _is_int(num_sink_tokens) or num_sink_tokens < 0:
      raise ValueError(
          f"Attention: num_sink_tokens must be a non-negative int, got {num_sink_tokens!r}.")
    if num_sink_tokens and local_window_size is None:
      raise ValueError(
          f"Attention: num_sink_tokens={num_sink_tokens} only widens a sliding window; set "
          "local_window_size too (without a window every key is visible already).")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size <= 0):
      raise ValueError(f"Attention: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if mask is not None:
      if not isinstance(mask, masks.Mask):
        raise ValueError(
            f"Attention: mask must be a pallas_kernels.masks.Mask (e.g. masks.per_head_windows"
            f"([...])), got {type(mask).__name__}.")
      if isinstance(mask, masks.PerHeadMask) and mask.num_heads != self.num_heads:
        raise ValueError(
            f"Attention: the per-head mask has {mask.num_heads} entries but the layer has "
            f"num_heads={self.num_heads}; give one mask per query head.")
    s2_mask = None
    if shifted_sparse_group_size is not None:
      if not _is_int(shifted_sparse_group_size):
        raise ValueError("Attention: shifted_sparse_group_size must be an even int >= 2 or "
                         f"None, got {shifted_sparse_group_size!r}.")
      try:
        s2_mask = _shifted_sparse_mask(self.num_heads, int(shifted_sparse_group_size),
                                       self.is_causal)
      except ValueError as error:
        raise ValueError(f"Attention: shifted_sparse_group_size={shifted_sparse_group_size} "
                         f"(LongLoRA S²-Attn): {error}") from None
    self.local_window_size = local_window_size
    self.num_sink_tokens = int(num_sink_tokens)
    self.chunk_size = None if chunk_size is None else int(chunk_size)
    self.mask = mask
    self.shifted_sparse_group_size = shifted_sparse_group_size
    self._s2_mask = s2_mask
    # The whole inference mask, built once: it also catches combinations the kernel rejects.
    self._inference_mask = masks.make_mask(
        is_causal=self.is_causal, local_window_size=local_window_size,
        num_sink_tokens=self.num_sink_tokens, chunk_size=self.chunk_size, mask=mask)

  def _set_position_extension(self, spec):
    """Validates ``position_extension``: it brings its own masks, so no other sparse option."""
    if spec is None:
      self.position_extension = None
      return
    extension = PositionExtension.create(spec)
    others = dict(local_window_size=self.local_window_size, num_sink_tokens=self.num_sink_tokens,
                  chunk_size=self.chunk_size, mask=self.mask,
                  shifted_sparse_group_size=self.shifted_sparse_group_size)
    clashing = sorted(name for name, value in others.items() if value)
    if clashing or not self.is_causal:
      raise ValueError(
          f"Attention: position_extension {extension.method!r} builds its own causal masks and "
          f"cannot be combined with {clashing or ['is_causal=False']}.")
    self.position_extension = extension
    self._inference_mask = extension.inference_mask()

  def _set_cache_policy(self, spec):
    """Validates ``cache_policy``: it replaces the exact cache of full causal attention."""
    try:
      self.cache_policy = kv_policies.make_cache_policy(spec)
    except ValueError as error:
      raise ValueError(f"Attention: {error}") from None
    if self.cache_policy is None:
      return
    full = all(attention_cache.window_of(m) == attention_cache.HeadWindow()
               for m in attention_cache.head_masks(self._inference_mask, self.num_heads))
    if not full or self.position_extension is not None:
      raise ValueError(
          f"Attention: cache_policy {self.cache_policy.name!r} needs full causal attention; "
          "this layer has a window, chunks, per-head masks or a position extension (their "
          "caches are already bounded or need every key).")
    if getattr(self.cache_policy, "memory_distance", None) is not None and self.rotary is None:
      raise ValueError(f"Attention: cache_policy {self.cache_policy.name!r} places its memory "
                       "at memory_distance through RoPE; this layer has none (rope_theta is "
                       "None): drop memory_distance.")

  def _set_compensation(self, compensation_token):
    """Validates ``compensation_token``; ``self._compensation`` holds, per key/value head,
    the window its hidden tokens are counted from (None: no compensation)."""
    if not isinstance(compensation_token, bool):
      raise ValueError(f"Attention: compensation_token must be a bool, got "
                       f"{compensation_token!r}.")
    self.compensation_token = compensation_token
    self._compensation = None
    if not compensation_token:
      return
    others = dict(cache_policy=self.cache_policy, position_extension=self.position_extension,
                  shifted_sparse_group_size=self.shifted_sparse_group_size)
    given = sorted(name for name, value in others.items() if value is not None)
    if given:
      raise ValueError(f"Attention: compensation_token cannot be combined with {given}.")
    try:
      self._compensation = compensation.kv_head_windows(self._inference_mask, self.num_heads,
                                                        self.num_kv_heads)
    except ValueError as error:
      raise ValueError(f"Attention: {error}") from None

  def _check_context_parallelism(self, plan: ContextParallelism | None) -> None:
    """Raises a ValueError for options the context-parallel kernels cannot run.

    They take causality, a sliding window, segments, GQA and a logit soft cap; masks tied to
    absolute positions or to heads do not survive the split of the sequence.
    """
    if plan is None:
      return
    unsupported = dict(num_sink_tokens=self.num_sink_tokens, chunk_size=self.chunk_size,
                       mask=self.mask, shifted_sparse_group_size=self.shifted_sparse_group_size,
                       position_extension=self.position_extension,
                       compensation_token=self.compensation_token)
    given = sorted(name for name, value in unsupported.items() if value)
    if plan.strategy == "ulysses" and (self.num_heads % plan.num_shards or
                                       self.num_kv_heads % plan.num_shards):
      raise ValueError(
          f"Attention: context parallelism ({plan.describe()}) splits the heads over the "
          f"{plan.num_shards} shards: num_heads ({self.num_heads}) and num_kv_heads "
          f"({self.num_kv_heads}) must both be divisible by {plan.num_shards}. Use "
          "context_parallelism.strategy = 'ring' or 'all_gather'.")
    if given:
      raise ValueError(
          f"Attention: {given} cannot run with context parallelism ({plan.describe()}): the "
          "context-parallel kernels support causality, a sliding window (local_window_size), "
          "segments, GQA and logits_soft_cap only. Drop them (e.g. a 'local_attention' "
          "without sinks, 'attention' without per_head_windows) or use make_mesh.context = 1.")

  def _attend_context_parallel(self, plan: ContextParallelism, q, k, v, segment_ids):
    """Exact attention with the sequence split over ``plan.axis_name`` (q/k/v [batch, seq,
    heads, head_dim], global arrays; each device works on its shard of the sequence)."""
    self._check_context_parallelism(plan)
    seq_len = q.shape[1]

    def kernel(q, k, v, segment_ids):
      if q.shape[1] * plan.num_shards != seq_len:
        raise ValueError(
            f"Attention: context parallelism expects the {seq_len} tokens split over "
            f"{plan.axis_name!r} ({plan.num_shards} shards), but a shard holds {q.shape[1]}: "
            "the axis rules must map the logical axis 'length' to that axis, and it must "
            "divide the sequence length.")
      return context_parallel_shard(
          q, k, v, axis_name=plan.axis_name, strategy=plan.strategy,
          load_balance=plan.load_balance, token_order=plan.token_order,
          is_causal=self.is_causal, segment_ids=segment_ids,
          local_window_size=self.local_window_size, logits_soft_cap=self.logits_soft_cap,
          implementation=self.implementation)

    return shard_kernel(
        kernel, (q, k, v, segment_ids),
        in_axes=(_CONTEXT_PARALLEL_AXES,) * 3 + (
            None if segment_ids is None else ("batch", "length"),),
        out_axes=_CONTEXT_PARALLEL_AXES)

  def _kernel_mask(self) -> masks.Mask | None:
    """The ``mask`` argument of the kernel: the user's mask, & S²-Attn while training."""
    if self._s2_mask is None or self.deterministic:
      return self.mask
    return self._s2_mask if self.mask is None else self.mask & self._s2_mask

  def kv_cache_tokens(self, seq_len: int) -> tuple[int, ...]:
    """Tokens each key/value head must keep cached after ``seq_len`` tokens, to decode on.

    A key stays cached while the current query (position ``seq_len - 1``) or a later one
    can see it: all ``seq_len`` keys for full causal attention, ``min(seq_len, w + 1 +
    sinks)`` for a causal window ``w`` (the query itself included), the current chunk for
    chunked attention. A key/value head keeps the union of what its query heads need.
    S²-Attn is training-only and does not count; a bidirectional layer keeps everything.
    """
    if not _is_int(seq_len) or seq_len < 0:
      raise ValueError(f"Attention.kv_cache_tokens: seq_len must be an int >= 0, got {seq_len!r}.")
    if not self.is_causal or seq_len == 0:
      return (int(seq_len),) * self.num_kv_heads
    if isinstance(self.cache_policy, kv_policies.CachePolicy):
      return (min(int(seq_len), self.cache_policy.budget),) * self.num_kv_heads
    mask = self._inference_mask
    head_masks = mask.masks if isinstance(mask, masks.PerHeadMask) else (mask,) * self.num_heads
    q_lo, q_hi = np.array([seq_len - 1], np.int64), np.array([masks.INF], np.int64)
    group = self.num_heads // self.num_kv_heads
    tokens = []
    for kv_head in range(self.num_kv_heads):
      intervals = []
      for head_mask in head_masks[kv_head * group:(kv_head + 1) * group]:
        visit, _ = head_mask.key_intervals(q_lo, q_hi)
        intervals += [(lo[0], hi[0]) for lo, hi in visit]
      tokens.append(_union_length(intervals, 0, seq_len))
    return tuple(tokens)

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the attention core at ``seq_len`` (beyond the q, k, v, o
    projections): ``{"attention": 2 * 2 * head_dim * sum over query heads of the keys a
    query sees on average}`` (q.k and p.v, 2 FLOPs per multiply-add; softmax not counted).

    The keys seen are counted exactly from the training mask (causal: (T + 1) / 2; a
    window w: min(w, ...) plus sinks; chunks; per-head windows; S²-Attn unless
    ``deterministic``), one query row at a time from the mask's interval view. Segments of
    packed rows are not known here: this is the count of one sequence of ``seq_len``.
    """
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"Attention.core_flops_per_token: seq_len must be a positive int, got "
                       f"{seq_len!r}.")
    t = int(seq_len)
    if self.position_extension is not None:
      mask = self._inference_mask
    else:
      mask = masks.make_mask(is_causal=self.is_causal, local_window_size=self.local_window_size,
                             num_sink_tokens=self.num_sink_tokens, chunk_size=self.chunk_size,
                             mask=self._kernel_mask())
    head_masks = mask.masks if isinstance(mask, masks.PerHeadMask) else (mask,)
    rows = np.arange(t, dtype=np.int64)
    keys_per_head = []
    for head_mask in dict.fromkeys(head_masks):  # each distinct mask once
      visit, _ = head_mask.key_intervals(rows, rows + 1)  # exact for single-query runs
      lo = np.stack([np.clip(a, 0, t) for a, _ in visit])
      hi = np.maximum(np.stack([np.clip(b, 0, t) for _, b in visit]), lo)
      order = np.argsort(lo, axis=0)
      lo, hi = np.take_along_axis(lo, order, 0), np.take_along_axis(hi, order, 0)
      covered, end = np.zeros(t, np.int64), np.zeros(t, np.int64)
      for a, b in zip(lo, hi):  # union length of the row's intervals
        start = np.maximum(a, end)
        covered += np.maximum(b - start, 0)
        end = np.maximum(end, b)
      keys_per_head.append((head_masks.count(head_mask), covered.mean()))
    per_query_head = sum(n * keys for n, keys in keys_per_head) / len(head_masks)
    return {"attention": 4.0 * self.num_heads * self.head_dim * float(per_query_head)}

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: AttentionCache | None = None,
               num_new_tokens: jax.Array | None = None):
    """Attends over the sequence of ``x``.

    Args:
      x: [batch, seq, features].
      position_ids: [batch, seq] (or [1, seq]) RoPE positions, integers (or floats for
        fractional positions, E²-LLM); default 0 .. seq - 1 for every row (with a cache:
        the row's length onwards). Packed sequences usually restart them at each segment.
        Unused without RoPE.
      segment_ids: integer [batch, seq]; tokens attend only within their segment.
      cache: None, or the decode cache of :meth:`init_cache`: ``x`` holds the next tokens
        of each row (a prompt, a prefill chunk or one token), which attend to the cached
        tokens and themselves; returns ``(out, new_cache)``.
      num_new_tokens: with a cache, int [batch] or None (all): row b's real tokens are
        ``x[b, :num_new_tokens[b]]``; the rest is right padding, whose outputs are
        unspecified and which the cache never stores.

    Returns:
      [batch, seq, features] (and the new cache when a cache is given).
    """
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(
          f"Attention: x must be [batch, seq, {self.features}], got shape {x.shape}."
      )
    if cache is not None:
      return self._call_cached(x, position_ids, segment_ids, cache, num_new_tokens)
    q, k, v = self._project(x)
    if self.rotary is not None and position_ids is None:
      position_ids = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    return self.o_proj(self._attend_sequence(q, k, v, position_ids, segment_ids))

  def _project(self, x):
    """q [b, t, heads, d], k, v [b, t, kv_heads, d] before RoPE (after QK-norm)."""
    # Named for the remat policies that keep them (lclm.model.layer_stack "minimal").
    q = checkpoint_name(self.q_proj(x), "query_proj")
    k = checkpoint_name(self.k_proj(x), "key_proj")
    v = checkpoint_name(self.v_proj(x), "value_proj")
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.query_multiplier is not None:
      # In float32: the multiplier rounded to bfloat16 would shift every logit by ~0.2%.
      q = (q.astype(jnp.float32) * self.query_multiplier).astype(q.dtype)
    return q, k, v

  def _attend_sequence(self, q, k, v, position_ids, segment_ids, *, inference=False,
                       rope_len=None):
    """Attention of the sequence over itself (q, k before RoPE): [b, t, heads, d].

    ``inference``: the mask inference uses whatever the train/eval mode (no S²-Attn).
    ``rope_len``: the length that length-dependent RoPE scaling reads (default
    ``max(position_ids) + 1``)."""
    q_far = k_far = pass_masks = None
    if self.position_extension is not None:
      passes = self._extension_passes(q, k, position_ids, rope_len)
      (q, k, _), pass_masks = passes[0], tuple(p[2] for p in passes)
      if len(passes) == 2:
        q_far, k_far = passes[1][:2]
    elif self.rotary is not None:
      if rope_len is None:
        rope_len = self.rotary.seq_len_of(position_ids)
      q_freq, k_freq = self.rotary.frequencies(rope_len)
      q = self.rotary.rotate(q, position_ids, q_freq)
      k = self.rotary.rotate(k, position_ids, k_freq)
    if self.capture_qk and hasattr(self, "__captures__"):  # Probing (class docstring).
      self.sow(nnx.Intermediate, CAPTURED_QK, (q, k))
    plan = context_parallelism()
    if plan is not None:  # The sequence is split over devices: ring / all-gather / Ulysses.
      return self._attend_context_parallel(plan, q, k, v, segment_ids)
    mask = self.mask if inference else self._kernel_mask()
    with_lse = self._compensation is not None
    flash_options = dict(scale=None, logits_soft_cap=self.logits_soft_cap,
                         implementation=self.implementation)

    def kernel(q, k, v, segment_ids, mask, q_far=None, k_far=None):
      if pass_masks is not None:  # The extension's near (and far) passes.
        qk = ((q, k),) if q_far is None else ((q, k), (q_far, k_far))
        return attend_passes(v, tuple((a, b, m) for (a, b), m in zip(qk, pass_masks)),
                             segment_ids=segment_ids, **flash_options)
      out = flash_attention(
          q, k, v, is_causal=self.is_causal, segment_ids=segment_ids,
          local_window_size=self.local_window_size, num_sink_tokens=self.num_sink_tokens,
          chunk_size=self.chunk_size, mask=mask, return_lse=with_lse, **flash_options)
      return _pack_lse(*out) if with_lse else out

    def attend(q, k, v, segment_ids, head_ids, q_far, k_far):
      return self._attend_heads(kernel, mask, q, k, v, segment_ids, head_ids, q_far, k_far)

    # Per shard of batch and heads under a sharded jit (the kernel is one custom call). The
    # sequence stays whole: splitting it needs ring attention, not a plain shard_map.
    # ``head_ids`` (the kv-head indices) is split like the heads, so that a shard knows
    # which heads, and hence which entries of a per-head mask, it holds.
    head_ids = jnp.arange(self.num_kv_heads, dtype=jnp.int32)
    out = shard_kernel(
        attend, (q, k, v, segment_ids, head_ids, q_far, k_far),
        in_axes=(_QUERY_AXES, _KV_AXES, _KV_AXES,
                 None if segment_ids is None else ("batch", None), _HEAD_IDS_AXES,
                 None if q_far is None else _QUERY_AXES, None if k_far is None else _KV_AXES),
        out_axes=_QUERY_AXES)
    if not with_lse:
      return out
    extra = compensation.sequence_term(q, k, v, self._compensation,
                                       soft_cap=self.logits_soft_cap, segment_ids=segment_ids)
    return merge_attention(*_unpack_lse(out), *extra)[0].astype(q.dtype)

  # ---------------------------------------------------------------------------- decoding

  def cache_plan(self) -> tuple[attention_cache.PartSpec, ...]:
    """The cache parts this layer decodes with (full, or sinks + ring, per kv-head group)."""
    return attention_cache.plan_parts(self._inference_mask, self.num_heads, self.num_kv_heads)

  def init_cache(self, batch_size: int, max_length: int, *,
                 dtype=None) -> AttentionCache | kv_policies.PolicyCache:
    """An empty decode cache for ``batch_size`` rows of up to ``max_length`` tokens.

    Full-attention heads get ``max_length`` slots; sliding-window heads (``local_attention``,
    DuoAttention's streaming heads) ``sinks + window`` slots whatever ``max_length``; with a
    ``cache_policy`` a :class:`~layers.kv_policies.PolicyCache` of ``min(budget,
    max_length)`` slots per key/value head. Keys and values are stored in ``dtype`` (default
    the layer's computation dtype, float32 if unset).
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
      if not _is_int(value) or value < 1:
        raise ValueError(f"Attention.init_cache: {name} must be a positive int, got {value!r}.")
    if not self.is_causal:
      raise ValueError("Attention.init_cache: a bidirectional layer cannot decode.")
    dtype = jnp.dtype(dtype or self.q_proj.dtype or jnp.float32)
    if isinstance(self.cache_policy, kv_retrieval.RetrievalPolicy):
      return kv_retrieval.init_retrieval_cache(self.cache_policy, int(batch_size),
                                               int(max_length), self.num_kv_heads,
                                               self.head_dim, dtype)
    if self.cache_policy is not None:
      return kv_policies.init_policy_cache(self.cache_policy, int(batch_size), int(max_length),
                                           self.num_kv_heads, self.head_dim, dtype)
    return attention_cache.init_cache(self.cache_plan(), int(batch_size), int(max_length),
                                      self.head_dim, dtype,
                                      keep_evicted=self._compensation is not None)

  def _check_cache(self, cache, batch, segment_ids):
    kind = {type(None): AttentionCache, kv_policies.CachePolicy: kv_policies.PolicyCache,
            kv_retrieval.RetrievalPolicy: kv_retrieval.RetrievalCache}[type(self.cache_policy)]
    if not isinstance(cache, kind):
      raise ValueError(f"Attention: cache must be the {kind.__name__} of this layer's "
                       f"init_cache, got {type(cache).__name__}.")
    if cache.batch_size != batch:
      raise ValueError(f"Attention: the cache was built for batch size {cache.batch_size}, "
                       f"but x has {batch} rows; build it with init_cache({batch}, ...).")
    if self.cache_policy is not None:
      layout, expected = cache.keys.shape[2:], (self.num_kv_heads, self.head_dim)
      if cache.policy != self.cache_policy:
        layout = None
    else:
      keeps_evicted = self._compensation is not None
      layout = tuple((p.kv_heads, p.keys.shape[-1], p.evicted_keys is not None)
                     for p in cache.parts)
      expected = tuple((s.kv_heads, self.head_dim, p.is_ring and keeps_evicted)
                       for s, p in zip(self.cache_plan(), cache.parts))
    if layout != expected:
      raise ValueError("Attention: the cache does not match this layer's heads (it was built "
                       "by another layer); use this layer's init_cache.")
    if segment_ids is not None:
      raise ValueError("Attention: segment_ids cannot be combined with a decode cache (packed "
                       "rows are not decoded).")
    if context_parallelism() is not None:
      raise ValueError("Attention: decoding with a cache is not context-parallel; decode with "
                       "make_mesh.context = 1.")

  def _call_cached(self, x, position_ids, segment_ids, cache, num_new_tokens):
    batch, seq = x.shape[:2]
    self._check_cache(cache, batch, segment_ids)
    if seq == 0:
      raise ValueError(f"Attention: decoding with a cache needs at least one new token, got x "
                       f"of shape {x.shape}.")
    lengths = cache.lengths
    if num_new_tokens is not None:
      num_new_tokens = jnp.clip(jnp.asarray(num_new_tokens, jnp.int32), 0, seq)
    token_index, valid = attention_cache.new_token_index(lengths, seq, num_new_tokens)
    new_lengths = lengths + (seq if num_new_tokens is None else num_new_tokens)
    if position_ids is None:
      position_ids = token_index
    position_ids = jnp.broadcast_to(position_ids, (batch, seq))
    q_raw, k_raw, v = self._project(x)
    # Length-dependent scaling (dynamic NTK, LongRoPE) reads the longest real position of
    # the call: padding must not change it.
    rope_len = (None if self.rotary is None else
                self.rotary.seq_len_of(jnp.where(valid, position_ids, 0)))
    if self.position_extension is None and self.rotary is not None:
      q_freq, k_freq = self.rotary.frequencies(rope_len)
      q = self.rotary.rotate(q_raw, position_ids, q_freq)
      k = self.rotary.rotate(k_raw, position_ids, k_freq)
    else:
      q, k = q_raw, k_raw  # No RoPE, or keys cached before it (position extensions).
    int_positions = (position_ids if jnp.issubdtype(position_ids.dtype, jnp.integer)
                     else jnp.floor(position_ids)).astype(jnp.int32)
    if isinstance(self.cache_policy, kv_retrieval.RetrievalPolicy):
      rotate = None
      if self.cache_policy.memory_distance is not None:  # The cache keeps keys before RoPE.
        q, k = q_raw, k_raw
        freqs = {"q": q_freq, "k": k_freq}
        rotate = lambda x, positions, kind: self.rotary.rotate(x, positions, freqs[kind])
      out, new_cache = kv_retrieval.step(cache, self._decode_retrieved, self._attend_candidates,
                                         q, k, v, token_index, valid, new_lengths, rotate)
      return self.o_proj(out), new_cache
    if self.cache_policy is not None:
      out, new_cache = kv_policies.step(cache, self._logits, q, k, v, token_index, int_positions,
                                        valid, new_lengths, block=_DENSE_QUERY_BLOCK)
      return self.o_proj(out), new_cache

    def write_all(parts):
      return tuple(attention_cache.write(
          part, k[:, :, list(part.kv_heads)], v[:, :, list(part.kv_heads)], int_positions,
          token_index, valid, new_lengths) for part in parts)

    if seq == 1 and self._decode_kernel_windows() is not None:
      parts = write_all(cache.parts)
      out = self._attend_decode_kernel(q, parts, new_lengths)
    else:
      def cached(_):
        return self._attend_cached_dense(q, k, v, cache.parts, token_index, valid,
                                         int_positions, rope_len)

      def fresh(_):  # Nothing cached yet: the sequence attends to itself (flash kernel).
        return self._attend_sequence(q_raw, k_raw, v, position_ids, None, inference=True,
                                     rope_len=rope_len).astype(q.dtype)

      out = jax.lax.cond(jnp.all(lengths == 0), fresh, cached, None)
      parts = write_all(cache.parts)
    return self.o_proj(out), AttentionCache(parts=parts, lengths=new_lengths)

  def _part_query_heads(self, part) -> list[int]:
    group = self.num_heads // self.num_kv_heads
    return [kv * group + g for kv in part.kv_heads for g in range(group)]

  def _assemble(self, outs, parts):
    """Per-part outputs [b, t, heads of part, d] -> [b, t, heads, d] in head order."""
    if len(parts) == 1:
      return outs[0]
    heads = [h for part in parts for h in self._part_query_heads(part)]
    order = np.argsort(np.asarray(heads))
    return jnp.concatenate(outs, axis=2)[:, :, order]

  def _decode_kernel_windows(self):
    """Per cache part, the (sinks, left) the decode kernel applies, or None when a part's
    query heads do not share one sink + window shape (then the dense path decodes)."""
    if self.position_extension is not None or not self.is_causal:
      return None
    shapes = [attention_cache.window_of(m) for m in
              attention_cache.head_masks(self._inference_mask, self.num_heads)]
    windows = []
    for spec in self.cache_plan():
      own = {shapes[h] for h in self._part_query_heads(spec)}
      if len(own) != 1 or None in own:
        return None
      windows.append(own.pop())
    return tuple(windows)

  def _attend_decode_kernel(self, q, parts, lengths):
    """One query per row over the cache (the token itself already written): the
    flash-decoding kernel, per cache part."""
    outs = []
    for part, window in zip(parts, self._decode_kernel_windows()):
      q_part = q[:, :, self._part_query_heads(part)] if len(parts) > 1 else q
      # A full part holds every token the row has, so its window hides none yet
      # (sinks + window >= max_length); a ring holds the window: what it hides has left it.
      compensated = self._part_compensation(part) if part.is_ring else None
      options = dict(logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
                     return_lse=compensated is not None)
      if part.is_ring:  # Every filled slot is within the window: no mask but the length.
        part_lengths = jnp.minimum(lengths, part.num_slots)
      else:
        part_lengths = lengths
        if not window.is_full:
          options.update(local_window_size=(window.left, 0), num_sink_tokens=window.sinks)

      def kernel(*args, options=options):
        out = decode_attention(*args, **options)
        return _pack_lse(*out) if options["return_lse"] else out

      out = shard_kernel(
          kernel, (q_part, part.keys, part.values, part_lengths),
          in_axes=(_QUERY_AXES, _KV_AXES, _KV_AXES, ("batch",)), out_axes=_QUERY_AXES)
      if compensated is not None:
        extra = compensation.cached_term(
            q_part, lengths[:, None] - 1, None, None, None, compensated,
            evicted_keys=part.evicted_keys, evicted_values=part.evicted_values,
            evicted_count=part.num_evicted(lengths), soft_cap=self.logits_soft_cap)
        out = merge_attention(*_unpack_lse(out), *extra)[0].astype(q.dtype)
      outs.append(out)
    return self._assemble(outs, parts)

  def _part_compensation(self, part) -> attention_cache.HeadWindow | None:
    """The window whose hidden tokens a cache part's heads are compensated for, or None."""
    return None if self._compensation is None else self._compensation[part.kv_heads[0]]

  def _decode_retrieved(self, q, keys, values, lengths, block_indices, *, local_window_size,
                        num_sink_tokens, return_lse):
    """Block-retrieval attention (:mod:`layers.kv_retrieval`): the queries q [b, t, h, d]
    (the last t of ``lengths`` entries) over the sinks, the window and, unless None, the
    blocks ``block_indices`` [b, kv_heads, top_k] of keys [b, slots, kv_heads, d]."""
    options = dict(local_window_size=local_window_size, num_sink_tokens=num_sink_tokens,
                   logits_soft_cap=self.logits_soft_cap, implementation=self.implementation)
    args, in_axes = (q, keys, values, lengths), (_QUERY_AXES, _KV_AXES, _KV_AXES, ("batch",))
    if block_indices is not None:
      options["block_k"] = self.cache_policy.block_size
      args, in_axes = args + (block_indices,), in_axes + (("batch", "kv_heads", None),)

    def kernel(q, keys, values, lengths, block_indices=None):
      result = decode_attention(q, keys, values, lengths, block_indices=block_indices,
                                return_lse=return_lse, **options)
      return _pack_lse(*result) if return_lse else result

    result = shard_kernel(kernel, args, in_axes=in_axes, out_axes=_QUERY_AXES)
    if not return_lse:
      return result
    out, lse = _unpack_lse(result)
    return out.astype(q.dtype), lse

  def _attend_candidates(self, q, keys, values, key_index, q_index, valid):
    """Exact causal attention of q [b, t, h, d] over candidate keys [b, C, kv_heads, d] at
    token indices key_index [b, C, kv_heads] (-1: none); XLA, in query blocks."""
    del valid
    out, _ = kv_policies.attend_and_score(
        self._logits, q, keys, values, key_index, q_index, jnp.zeros(q.shape[:2], bool),
        out_dtype=q.dtype, block=_DENSE_QUERY_BLOCK)
    return out

  def _attend_cached_dense(self, q, k, v, parts, token_index, valid, positions, rope_len):
    """Queries [b, t, heads, d] over the cached tokens and the new ones, masked by token
    index with the layer's mask (exact for every option). XLA; the queries go in blocks of
    ``_DENSE_QUERY_BLOCK``, so memory is O(block x (slots + t)) per head."""
    b, t = q.shape[:2]
    per_head = attention_cache.head_masks(self._inference_mask, self.num_heads)
    block = min(t, _DENSE_QUERY_BLOCK)

    outs = []
    for part in parts:
      heads = self._part_query_heads(part)
      kv = list(part.kv_heads)
      keys = jnp.concatenate([part.keys, k[:, :, kv].astype(part.keys.dtype)], axis=1)
      values = jnp.concatenate([part.values, v[:, :, kv].astype(part.values.dtype)], axis=1)
      values = values.astype(jnp.float32)
      k_index = jnp.concatenate([part.token_index, jnp.where(valid, token_index, -1)], axis=1)
      k_pos = jnp.concatenate([part.positions, positions], axis=1)
      present = (k_index >= 0)[:, None, :]
      # Only a ring's heads ever hide a token (see _attend_decode_kernel).
      compensated = self._part_compensation(part) if part.is_ring else None

      def attend(args, heads=heads, kv=kv, keys=keys, values=values, k_index=k_index,
                 k_pos=k_pos, present=present, part=part, compensated=compensated):
        q_part, q_index, q_pos = args
        visible = jnp.stack([present & per_head[h].visible(q_index[:, :, None],
                                                           k_index[:, None, :])
                             for h in heads], axis=1)  # [b, heads of part, block, keys]
        visible = visible.reshape(b, len(kv), len(heads) // len(kv), q_part.shape[1], -1)
        if self.position_extension is not None:
          logits, visible = self._extension_logits(q_part, keys, kv, q_pos, k_pos, q_index,
                                                   k_index, visible, rope_len)
        else:
          logits = self._logits(q_part, keys)
        if compensated is None:
          return masked_softmax_attention(logits, visible, values, q.dtype)[0]
        # The tokens that left the ring before this call are hidden from all its queries.
        extra = compensation.cached_term(
            q_part, q_index, keys, values, k_index, compensated,
            evicted_keys=part.evicted_keys, evicted_values=part.evicted_values,
            evicted_count=part.num_evicted(token_index[:, 0]), soft_cap=self.logits_soft_cap)
        out = merge_attention(*masked_softmax_attention(logits, visible, values, jnp.float32),
                              *extra)[0]
        return out.astype(q.dtype)

      args = (q[:, :, heads], token_index, positions)
      if block == t:
        outs.append(attend(args))
      else:
        out = jax.lax.map(attend, tuple(attention_cache.query_blocks(a, block) for a in args))
        outs.append(attention_cache.from_query_blocks(out, t))
    return self._assemble(outs, parts)

  def _logits(self, q, keys):
    """Scaled (and capped) float32 logits [b, kv_heads, group, t, keys]."""
    b, t, h, d = q.shape
    hk = keys.shape[2]
    q = q.reshape(b, t, hk, h // hk, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    if self.logits_soft_cap is not None:
      logits = self.logits_soft_cap * jnp.tanh(logits / self.logits_soft_cap)
    return logits

  def _extension_logits(self, q_raw, keys_raw, kv_heads, q_pos, k_pos, q_index, k_index,
                        visible, rope_len):
    """Self-Extend / LM-Infinite per pair: near keys at their real positions, far keys at
    the method's remapped ones (keys are cached before RoPE)."""
    o = self.position_extension.options
    q_freq, k_freq = self.rotary.frequencies(rope_len)
    if k_freq.inv_freq.ndim == 2:  # Per-head bases: the key rows of this part's heads.
      k_freq = k_freq._replace(inv_freq=k_freq.inv_freq[np.asarray(kv_heads)])
    if q_freq.inv_freq.ndim == 2:
      group = self.num_heads // self.num_kv_heads
      rows = [kv * group + g for kv in kv_heads for g in range(group)]
      q_freq = q_freq._replace(inv_freq=q_freq.inv_freq[np.asarray(rows)])
    rotate = self.rotary.rotate
    near = self._logits(rotate(q_raw, q_pos, q_freq), rotate(keys_raw, k_pos, k_freq))
    distance = q_index[:, :, None] - k_index[:, None, :]
    if self.position_extension.method == "self_extend":
      g, w = o["group_size"], o["window"]
      far_q, far_k = q_pos // g + (w - w // g), k_pos // g
      is_near = distance < w
      reach = jnp.ones_like(is_near)
    else:
      far_q, far_k = jnp.minimum(q_pos, o["max_distance"]), jnp.zeros_like(k_pos)
      is_near = distance < o["local_window"]
      reach = is_near | (k_index < o["num_global"])[:, None, :]
    far = self._logits(rotate(q_raw, far_q, q_freq), rotate(keys_raw, far_k, k_freq))
    is_near = is_near[:, None, None]
    return jnp.where(is_near, near, far), visible & reach[:, None, None]

  def _extension_passes(self, q, k, position_ids, rope_len=None):
    """The (rotated q, rotated k, mask options) passes of the position extension (one or
    two: LM-Infinite without sinks is its window alone)."""
    if not jnp.issubdtype(position_ids.dtype, jnp.integer):
      raise ValueError(f"Attention: position_extension {self.position_extension.method!r} "
                       f"needs integer position_ids, got dtype {position_ids.dtype}.")
    position_ids = jnp.broadcast_to(position_ids, q.shape[:2])
    if rope_len is None:
      rope_len = self.rotary.seq_len_of(position_ids)
    q_freq, k_freq = self.rotary.frequencies(rope_len)
    return self.position_extension.passes(q, k, position_ids=position_ids, freqs=q_freq,
                                          key_freqs=k_freq, layout=self.rotary.layout)

  def _attend_heads(self, kernel, mask, q, k, v, segment_ids, head_ids, q_far=None,
                    k_far=None):
    """Runs ``kernel`` on the heads of one shard, with the entries of a per-head mask that
    belong to them (all heads, unsharded: the mask as it is)."""
    local_kv_heads, local_heads = k.shape[2], q.shape[2]
    if not isinstance(mask, masks.PerHeadMask) or local_kv_heads == self.num_kv_heads:
      return kernel(q, k, v, segment_ids, mask, q_far, k_far)
    # Heads split into contiguous blocks of local_heads query heads: one mask per block.
    blocks = [masks.PerHeadMask(mask.masks[start:start + local_heads])
              for start in range(0, self.num_heads, local_heads)]
    if len(set(blocks)) == 1:
      return kernel(q, k, v, segment_ids, blocks[0])
    branches = [lambda q, k, v, s, m=m: kernel(q, k, v, s, m) for m in blocks]
    return jax.lax.switch(head_ids[0] // local_kv_heads, branches, q, k, v, segment_ids)


def _pack_lse(out, lse):
  """One array for shard_kernel: the float32 lse [b, t, h] rides as a last feature."""
  return jnp.concatenate([out.astype(jnp.float32), lse[..., None]], axis=-1)


def _unpack_lse(packed):
  """(out float32 [b, t, h, d], lse [b, t, h]) of :func:`_pack_lse`."""
  return packed[..., :-1], packed[..., -1]
