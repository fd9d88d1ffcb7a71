"""Retrieval-head probe: a copy-paste score per attention head on needle tasks, and the
DuoAttention ``per_head_windows`` configuration it implies.

Score (Retrieval Head, Wu et al. 2024). The model reads needle examples teacher-forced; at
every answer position ``t`` of a row (``loss_mask[b, t] > 0``: the model, having read
``inputs[b, :t + 1]``, must produce ``targets[b, t]``) a head *copies and pastes* when

* the model's argmax at ``t`` equals ``targets[b, t]`` (the paper scores generated tokens;
  ``require_correct=False`` drops this condition), and
* the key position ``j`` the head attends to most at query ``t`` (argmax of its attention
  probabilities over the keys it can see: causal, same segment, and the layer's own mask) is
  a needle position holding that token: ``needle[b, j]`` and ``inputs[b, j] == targets[b, t]``.

A head's score is the fraction of all answer positions of all batches at which it copies and
pastes: in [0, 1]. Heads of layers that are not :class:`layers.Attention` (Mamba, Titans, ...)
get NaN. Attention probabilities come from the queries and keys the layer's kernel sees
(captured with the layer's ``capture_qk`` hook: QK-norm, attention scale and RoPE applied),
in float32, for the answer rows only, ``query_chunk_size`` rows at a time: memory is
O(batch x heads x chunk x seq) per layer, never a [seq, seq] matrix per head.

Where the needle is, per row, first found of:

1. ``needle_spans`` given to :func:`retrieval_scores` (one int [batch, 2] array of [start,
   end) per batch);
2. the batch's ``needle_start`` / ``needle_end`` (int [batch]);
3. the batch's ``key_position`` (the passkey task's feature): the answer's length of
   positions from it, [key_position, key_position + answer tokens of the row);
4. otherwise every prompt position, i.e. before the row's first answer position: a head then
   counts when it attends to any earlier prompt position holding the target token.

Batches (:func:`passkey_batches` makes them) are dicts of numpy arrays: ``inputs``,
``targets`` int [B, T], ``loss_mask`` [B, T], optional ``position_ids`` [B, T] (default 0 ..
T - 1), ``segment_ids`` [B, T] and the needle keys above. A passkey row is

  <bos> INTRO filler... NEEDLE filler... QUESTION KEY

(:mod:`lclm.data.passkey`, ``seq_len + 1`` tokens; inputs / targets drop the last / first),
with the needle the whole sentence "The pass key is KEY. Remember it: KEY is the pass key. ",
which holds the key twice, and answer positions the key's digits at the end.

Configuration. :func:`per_head_windows_config` turns scores into gin text binding
``DecoderLM.layer_options``: in every scored attention layer the retrieval heads (the top
``retrieval_fraction`` of all heads, or those scoring at least ``threshold``) keep full
attention (None) and the others become streaming heads (``num_sink_tokens`` sinks and a window
of ``streaming_window`` tokens), as DuoAttention configs (``configs/mixers/duo_attention.gin``)
write them by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import Attention
from layers.attention import CAPTURED_QK
from lclm.data import passkey
from pallas_kernels import masks

DEFAULT_QUERY_CHUNK_SIZE = 32


# ------------------------------------------------------------------------------- batches


def passkey_batches(seq_len: int, *, num_examples: int, batch_size: int, seed: int = 0,
                    num_digits: int = 5) -> list[dict[str, np.ndarray]]:
  """Passkey examples (:func:`lclm.data.passkey.make_passkey_example`, needle depth drawn
  uniformly) as probe batches.

  Returns:
    ``ceil(num_examples / batch_size)`` dicts: ``inputs``, ``targets``, ``position_ids``
    (0 .. seq_len - 1), ``segment_ids`` (1) int32 [rows, seq_len], ``loss_mask`` uint8
    [rows, seq_len]; ``key_position``, ``needle_start``, ``needle_end`` int32 [rows] (the
    needle sentence, [start, end) in ``inputs``). The last batch holds the remaining rows.
    Deterministic given ``seed``.
  """
  for name, value in (("seq_len", seq_len), ("num_examples", num_examples),
                      ("batch_size", batch_size), ("num_digits", num_digits)):
    if not _is_int(value) or value < 1:
      raise ValueError(f"passkey_batches: {name} must be a positive int, got {value!r}.")
  config = passkey.PasskeyConfig(seq_len=int(seq_len), num_digits=int(num_digits))
  rng = np.random.default_rng(seed)
  examples = [passkey.make_passkey_example(rng, config) for _ in range(num_examples)]
  suffix = len(passkey.NEEDLE_SUFFIX_TEMPLATE.format(key="0" * num_digits))
  def needle(rows):
    key_position = np.array([r["key_position"] for r in rows], np.int32)
    return {"key_position": key_position,
            "needle_start": key_position - len(passkey.NEEDLE_PREFIX),
            "needle_end": key_position + num_digits + suffix}

  return _probe_batches(examples, seq_len, batch_size, needle)


def _probe_batches(examples, seq_len, batch_size, needle) -> list[dict[str, np.ndarray]]:
  """Examples in batches of ``batch_size`` rows (one sequence per row from position 0), each
  with the needle arrays ``needle(rows)`` returns."""
  batches = []
  for start in range(0, len(examples), batch_size):
    rows = examples[start:start + batch_size]
    batches.append({
        "inputs": np.stack([r["inputs"] for r in rows]).astype(np.int32),
        "targets": np.stack([r["targets"] for r in rows]).astype(np.int32),
        "loss_mask": np.stack([r["loss_mask"] for r in rows]),
        "position_ids": np.tile(np.arange(seq_len, dtype=np.int32), (len(rows), 1)),
        "segment_ids": np.ones((len(rows), seq_len), np.int32),
        **needle(rows),
    })
  return batches


def niah_batches(seq_len: int, *, vocab_size: int, num_examples: int, batch_size: int,
                 seed: int = 0, variant: str = "single", **options) -> list[dict[str, np.ndarray]]:
  """Token-level needle examples (:mod:`lclm.data.ruler`, ``variant`` single or multikey,
  needle depth drawn uniformly) as probe batches over the model's own vocabulary.

  Returns dicts like :func:`passkey_batches`, with ``needle_start`` / ``needle_end`` the
  queried needle (``KEY k.. VALUE v.. SEP``); the answer is its value. ``options`` are fields
  of :class:`lclm.data.ruler.NiahConfig` (``key_len``, ``value_len``, ``num_needles``, ...).
  """
  from lclm.data import ruler  # pylint: disable=g-import-not-at-top

  for name, value in (("seq_len", seq_len), ("num_examples", num_examples),
                      ("batch_size", batch_size)):
    if not _is_int(value) or value < 1:
      raise ValueError(f"niah_batches: {name} must be a positive int, got {value!r}.")
  if variant not in ("single", "multikey"):
    raise ValueError(f"niah_batches: variant must be 'single' or 'multikey' (one queried "
                     f"needle), got {variant!r}.")
  config = ruler.NiahConfig(seq_len=int(seq_len), vocab_size=int(vocab_size), variant=variant,
                            **options)
  rng = np.random.default_rng(seed)
  examples = [ruler.make_niah_example(rng, config) for _ in range(num_examples)]
  def needle(rows):
    start = np.array([r["needle_position"] for r in rows], np.int32)
    return {"needle_start": start, "needle_end": start + config.needle_len}

  return _probe_batches(examples, seq_len, batch_size, needle)


def answer_positions(loss_mask) -> tuple[np.ndarray, np.ndarray]:
  """The answer positions of each row, left-aligned and padded.

  Args:
    loss_mask: [B, T]; answer positions are where it is > 0.

  Returns:
    ``(positions, valid)``: int32 [B, A] (A the most answers of a row, at least 1; padding
    entries 0) and bool [B, A].
  """
  mask = np.asarray(loss_mask) > 0
  if mask.ndim != 2:
    raise ValueError(f"answer_positions: loss_mask must be [batch, seq], got shape {mask.shape}.")
  counts = mask.sum(axis=1)
  width = max(int(counts.max(initial=0)), 1)
  positions = np.zeros((mask.shape[0], width), np.int32)
  valid = np.arange(width)[None, :] < counts[:, None]
  for row in range(mask.shape[0]):
    found = np.flatnonzero(mask[row])
    positions[row, :found.size] = found
  return positions, valid


def needle_mask(batch: dict[str, Any], needle_spans=None) -> np.ndarray:
  """bool [B, T]: the needle positions of each row (see the module docstring for the order of
  the sources: ``needle_spans`` int [B, 2], ``needle_start``/``needle_end``, ``key_position``,
  else every position before the row's first answer)."""
  loss_mask = np.asarray(batch["loss_mask"]) > 0
  rows, length = loss_mask.shape
  index = np.arange(length)[None, :]
  if needle_spans is not None:
    spans = np.asarray(needle_spans)
    if spans.shape != (rows, 2) or not np.issubdtype(spans.dtype, np.integer):
      raise ValueError(f"retrieval_scores: each needle_spans entry must be int [batch, 2] = "
                       f"[{rows}, 2] of [start, end) positions, got {spans.dtype}{spans.shape}.")
    start, end = spans[:, 0], spans[:, 1]
  elif "needle_start" in batch and "needle_end" in batch:
    start, end = np.asarray(batch["needle_start"]), np.asarray(batch["needle_end"])
  elif "key_position" in batch:
    start = np.asarray(batch["key_position"])
    end = start + loss_mask.sum(axis=1)
  else:  # Fallback: the whole prompt before the first answer position.
    first = np.where(loss_mask.any(axis=1), loss_mask.argmax(axis=1), length)
    return index < first[:, None]
  start, end = np.asarray(start).reshape(rows, 1), np.asarray(end).reshape(rows, 1)
  return (index >= start) & (index < end)


# ------------------------------------------------------------------- attention of answer rows


def layer_mask(layer: Attention) -> masks.Mask:
  """The causal inference mask of an :class:`layers.Attention` layer (window, sinks, chunks,
  per-head mask; no training-only S²-Attn), as a :class:`pallas_kernels.masks.Mask`."""
  return masks.make_mask(is_causal=True, local_window_size=layer.local_window_size,
                         num_sink_tokens=layer.num_sink_tokens, chunk_size=layer.chunk_size,
                         mask=layer.mask)


def _row_probabilities(q, k, query_positions, segment_ids, mask, logits_soft_cap):
  """float32 [B, H, A, T] attention probabilities of the rows ``query_positions`` [B, A]."""
  b, t, h, d = q.shape
  hk = k.shape[2]
  a = query_positions.shape[1]
  rows = jnp.take_along_axis(q, query_positions[:, :, None, None], axis=1)  # [B, A, H, D]
  rows = rows.astype(jnp.float32).reshape(b, a, hk, h // hk, d)
  logits = jnp.einsum("bahgd,bkhd->bhgak", rows, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).reshape(b, h, a, t) * (d ** -0.5)
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  q_pos = query_positions[:, None, :, None]  # [B, 1, A, 1]
  k_pos = jnp.arange(t, dtype=jnp.int32)[None, None, None, :]
  if isinstance(mask, masks.PerHeadMask):
    visible = jnp.concatenate([m.visible(q_pos, k_pos) for m in mask.masks], axis=1)
  else:
    visible = jnp.broadcast_to(mask.visible(q_pos, k_pos), (b, 1, a, t))
  visible = visible & (k_pos <= q_pos)
  if segment_ids is not None:
    q_seg = jnp.take_along_axis(segment_ids, query_positions, axis=1)
    visible = visible & (q_seg[:, None, :, None] == segment_ids[:, None, None, :])
  logits = jnp.where(visible, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def attention_rows(q, k, query_positions, *, segment_ids=None, mask: masks.Mask | None = None,
                   logits_soft_cap: float | None = None) -> jax.Array:
  """Attention probabilities of some query rows, in float32.

  Args:
    q: [B, T, H, D] queries as the kernel gets them (logits are ``q . k * D ** -0.5``).
    k: [B, T, Hk, D] keys (Hk divides H; query head h reads key head ``h // (H // Hk)``).
    query_positions: int [B, A] rows to compute (positions in the sequence).
    segment_ids: int [B, T] or None; a query sees keys of its own segment only.
    mask: the layer's mask (default causal); causality is always applied.
    logits_soft_cap: as the layer's.

  Returns:
    float32 [B, H, A, T]; each row sums to 1 over its visible keys, 0 elsewhere.
  """
  mask = masks.make_mask(is_causal=True) if mask is None else mask
  query_positions = jnp.asarray(query_positions, jnp.int32)
  return _row_probabilities(q, k, query_positions, segment_ids, mask, logits_soft_cap)


def top_attended_keys(q, k, query_positions, *, segment_ids=None,
                      mask: masks.Mask | None = None, logits_soft_cap: float | None = None,
                      chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE) -> jax.Array:
  """int32 [B, H, A]: for each head and query row, the key position it attends to most.

  Arguments as :func:`attention_rows`; the rows go ``chunk_size`` at a time (memory
  O(B x H x chunk_size x T)). Ties go to the earliest key.
  """
  if not _is_int(chunk_size) or chunk_size < 1:
    raise ValueError(f"top_attended_keys: chunk_size must be a positive int, got "
                     f"{chunk_size!r}.")
  mask = masks.make_mask(is_causal=True) if mask is None else mask
  return _top_keys(q, k, jnp.asarray(query_positions, jnp.int32), segment_ids, mask,
                   logits_soft_cap, int(chunk_size))


def _top_keys(q, k, query_positions, segment_ids, mask, logits_soft_cap, chunk_size):
  b, a = query_positions.shape
  chunk = min(chunk_size, a)
  num_chunks = -(-a // chunk)
  padded = jnp.pad(query_positions, ((0, 0), (0, num_chunks * chunk - a)))
  chunks = jnp.moveaxis(padded.reshape(b, num_chunks, chunk), 1, 0)  # [C, B, chunk]

  def one(positions):
    probs = _row_probabilities(q, k, positions, segment_ids, mask, logits_soft_cap)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)  # [B, H, chunk]

  top = jax.lax.map(one, chunks)  # [C, B, H, chunk]
  top = jnp.moveaxis(top, 0, 2).reshape(b, top.shape[2], num_chunks * chunk)
  return top[:, :, :a]


def copy_paste_hits(top_keys, tokens, targets, valid, needle, correct=None) -> np.ndarray:
  """bool [B, H, A]: where a head copies and pastes from the needle.

  Args:
    top_keys: int [B, H, A], the most-attended key position of each head and answer row.
    tokens: int [B, T], the inputs (the token at each position).
    targets: int [B, A], the token each answer row must produce.
    valid: bool [B, A], real answer rows (False: padding).
    needle: bool [B, T], the needle positions.
    correct: bool [B, A] or None; where the model produced the target (None: everywhere).

  Returns:
    ``valid & correct & needle[top] & (tokens[top] == targets)`` per head.
  """
  top = np.asarray(top_keys)
  if top.ndim != 3:
    raise ValueError(f"copy_paste_hits: top_keys must be [batch, heads, answers], got shape "
                     f"{top.shape}.")
  tokens, needle = np.asarray(tokens), np.asarray(needle, bool)
  rows = np.arange(top.shape[0])[:, None, None]
  copied = needle[rows, top] & (tokens[rows, top] == np.asarray(targets)[:, None, :])
  ok = np.asarray(valid, bool)
  if correct is not None:
    ok = ok & np.asarray(correct, bool)
  return copied & ok[:, None, :]


# ------------------------------------------------------------------------------- the probe


@dataclasses.dataclass
class RetrievalCounts:
  """What :func:`retrieval_counts` found.

  Attributes:
    hits: int64 [num_layers, max heads] copy-paste counts (-1 for layers or heads that are
      not attention heads).
    answer_tokens: answer positions scored.
    correct_tokens: those at which the model's argmax was the target.
    attention_layers: the indices of the scored (attention) layers.
  """
  hits: np.ndarray
  answer_tokens: int
  correct_tokens: int
  attention_layers: tuple[int, ...]

  @property
  def scores(self) -> np.ndarray:
    """float64 [num_layers, max heads]: hits / answer tokens, NaN off attention heads."""
    scores = self.hits / max(self.answer_tokens, 1)
    return np.where(self.hits < 0, np.nan, scores)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "probe"))
def _run_block(graphdef, state, x, position_ids, segment_ids, query_positions, *,
               chunk_size, probe):
  """One decoder block on x: (its output, top keys int32 [B, H, A] or None)."""
  block = nnx.merge(graphdef, state)

  def run(block, x):
    return block(x, position_ids=position_ids, segment_ids=segment_ids)

  if not probe:
    return run(block, x), None
  y, sown = nnx.capture(run, nnx.Intermediate)(block, x)
  captured = [v.get_value() for path, v in nnx.to_flat_state(sown) if path[-1] == CAPTURED_QK]
  if len(captured) != 1 or len(captured[0]) != 1:
    raise ValueError(f"retrieval_scores: expected one captured (q, k) from the block's "
                     f"attention, got {len(captured)}.")
  q, k = captured[0][0]
  mixer = block.mixer
  top = _top_keys(q, k, query_positions, segment_ids, layer_mask(mixer),
                  mixer.logits_soft_cap, chunk_size)
  return y, top


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens):
  model = nnx.merge(graphdef, state)
  x = model.embed(tokens)
  if model.embedding_multiplier is not None:
    x = x * jnp.asarray(model.embedding_multiplier, x.dtype)
  return x


@functools.partial(jax.jit, static_argnums=0)
def _answer_argmax(graphdef, state, x, query_positions):
  model = nnx.merge(graphdef, state)
  rows = jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
  return jnp.argmax(model.logits_from_hidden(model.final_norm(rows)), axis=-1)


def _probe_blocks(model) -> list[tuple[Any, bool]]:
  """Copies of the model's blocks (the flag set on attention mixers) and whether each is
  probed."""
  blocks = []
  for index, block in enumerate(model.layer_blocks()):
    block = nnx.merge(*nnx.split(block))  # A copy: the model itself stays unchanged.
    probe = isinstance(block.mixer, Attention)
    if probe:
      if block.mixer.position_extension is not None:
        raise ValueError(
            f"retrieval_scores: layer {index} uses the position extension "
            f"{block.mixer.position_extension.method!r}, whose two attention passes have no "
            "single attention map; probe the model without it.")
      block.mixer.capture_qk = True
    blocks.append((block, probe))
  return blocks


def retrieval_counts(model, batches: Iterable[dict[str, Any]], *,
                     needle_spans: Sequence[Any] | None = None, require_correct: bool = True,
                     query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE) -> RetrievalCounts:
  """Copy-paste counts of every head over ``batches`` (see the module docstring).

  Args:
    model: a :class:`lclm.model.DecoderLM` (scanned or not); it is not modified.
    batches: dicts with ``inputs``, ``targets``, ``loss_mask`` [B, T] (optional
      ``position_ids``, ``segment_ids`` and needle keys).
    needle_spans: None, or one int [B, 2] array of [start, end) needle positions per batch.
    require_correct: count an answer position only where the model's argmax is the target.
    query_chunk_size: answer rows per attention chunk.
  """
  if not _is_int(query_chunk_size) or query_chunk_size < 1:
    raise ValueError(f"retrieval_scores: query_chunk_size must be a positive int, got "
                     f"{query_chunk_size!r}.")
  blocks = _probe_blocks(model)
  split_blocks = [(nnx.split(block), probe) for block, probe in blocks]
  heads = [block.mixer.num_heads if probe else 0 for block, probe in blocks]
  width = max(heads) if any(heads) else 0
  hits = np.full((len(blocks), max(width, 1)), -1, np.int64)
  for index, count in enumerate(heads):
    hits[index, :count] = 0
  model_graphdef, model_state = nnx.split(model)
  answer_tokens = correct_tokens = 0
  batches = list(batches)
  if needle_spans is not None and len(needle_spans) != len(batches):
    raise ValueError(f"retrieval_scores: needle_spans has {len(needle_spans)} entries for "
                     f"{len(batches)} batches; give one int [batch, 2] array per batch.")
  for number, batch in enumerate(batches):
    for key in ("inputs", "targets", "loss_mask"):
      if key not in batch:
        raise ValueError(f"retrieval_scores: batch {number} has no {key!r}; batches need "
                         f"inputs, targets and loss_mask, got keys {sorted(batch)}.")
    tokens = np.asarray(batch["inputs"])
    if tokens.ndim != 2:
      raise ValueError(f"retrieval_scores: inputs must be [batch, seq], got shape "
                       f"{tokens.shape}.")
    positions, valid = answer_positions(batch["loss_mask"])
    if not valid.any():
      continue
    needle = needle_mask(batch, None if needle_spans is None else needle_spans[number])
    targets = np.take_along_axis(np.asarray(batch["targets"]), positions, axis=1)
    position_ids = batch.get("position_ids")
    if position_ids is None:
      position_ids = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
    segment_ids = batch.get("segment_ids")
    args = (jnp.asarray(position_ids),
            None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
            jnp.asarray(positions))
    x = _embed(model_graphdef, model_state, jnp.asarray(tokens, jnp.int32))
    tops = []
    for index, ((graphdef, state), probe) in enumerate(split_blocks):
      x, top = _run_block(graphdef, state, x, *args, chunk_size=int(query_chunk_size),
                          probe=probe)
      tops.append((index, top))
    predicted = np.asarray(_answer_argmax(model_graphdef, model_state, x, args[2]))
    correct = (predicted == targets) & valid
    answer_tokens += int(valid.sum())
    correct_tokens += int(correct.sum())
    for index, top in tops:
      if top is None:
        continue
      layer_hits = copy_paste_hits(np.asarray(top), tokens, targets, valid, needle,
                                   correct if require_correct else None)
      hits[index, :layer_hits.shape[1]] += layer_hits.sum(axis=(0, 2))
  if not answer_tokens:
    raise ValueError("retrieval_scores: the batches hold no answer positions (loss_mask is 0 "
                     "everywhere); give needle batches with answers.")
  return RetrievalCounts(hits=hits, answer_tokens=answer_tokens, correct_tokens=correct_tokens,
                         attention_layers=tuple(i for i, count in enumerate(heads) if count))


def retrieval_scores(model, batches: Iterable[dict[str, Any]], *,
                     needle_spans: Sequence[Any] | None = None, require_correct: bool = True,
                     query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE) -> np.ndarray:
  """float64 [num_layers, num_heads]: each head's retrieval (copy-paste) score in [0, 1], NaN
  for layers that are not attention (and for missing heads of layers with fewer heads).
  Arguments as :func:`retrieval_counts`."""
  return retrieval_counts(model, batches, needle_spans=needle_spans,
                          require_correct=require_correct,
                          query_chunk_size=query_chunk_size).scores


# --------------------------------------------------------------------------- configuration


def select_retrieval_heads(scores, *, retrieval_fraction: float | None = None,
                           threshold: float | None = None) -> np.ndarray:
  """bool [num_layers, num_heads]: the retrieval heads among the finite scores.

  Exactly one of ``retrieval_fraction`` (in (0, 1]: the ``ceil(fraction x heads)`` best heads
  of the whole model; ties go to the earlier layer, then head) and ``threshold`` (heads
  scoring at least it) must be given.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"select_retrieval_heads: scores must be [num_layers, num_heads], got "
                     f"shape {scores.shape}.")
  if (retrieval_fraction is None) == (threshold is None):
    raise ValueError("select_retrieval_heads: give exactly one of retrieval_fraction (e.g. "
                     f"0.25) and threshold (e.g. 0.1); got retrieval_fraction="
                     f"{retrieval_fraction!r}, threshold={threshold!r}.")
  finite = np.isfinite(scores)
  if not finite.any():
    raise ValueError("select_retrieval_heads: no finite score (the model has no attention "
                     "layer).")
  if threshold is not None:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
      raise ValueError(f"select_retrieval_heads: threshold must be a number, got "
                       f"{threshold!r}.")
    return finite & (np.where(finite, scores, -np.inf) >= threshold)
  if (not isinstance(retrieval_fraction, (int, float)) or isinstance(retrieval_fraction, bool)
      or not 0 < retrieval_fraction <= 1):
    raise ValueError(f"select_retrieval_heads: retrieval_fraction must be in (0, 1], got "
                     f"{retrieval_fraction!r}.")
  count = int(math.ceil(retrieval_fraction * finite.sum() - 1e-9))
  order = np.argsort(-np.where(finite, scores, -np.inf), axis=None, kind="stable")
  chosen = np.zeros(scores.size, bool)
  chosen[order[:count]] = True
  return chosen.reshape(scores.shape) & finite


def per_head_windows_config(scores, *, retrieval_fraction: float | None = None,
                            threshold: float | None = None, streaming_window: int,
                            num_sink_tokens: int, mixer: str = "attention",
                            layer_pattern: Sequence[str] | None = None,
                            source: str | None = None) -> str:
  """Gin text binding ``DecoderLM.layer_options`` to DuoAttention per-head windows.

  Every layer with finite scores (an attention layer; with ``layer_pattern``, only those
  whose mixer is ``mixer``, the mixer that takes ``per_head_windows``) gets
  ``{"per_head_windows": [...], "num_sink_tokens": num_sink_tokens}``: None for its retrieval
  heads (:func:`select_retrieval_heads`), ``streaming_window`` for the others. A comment
  header gives the rule, the scores and ``source`` (e.g. the probed run). The binding
  replaces any other ``DecoderLM.layer_options`` of the configuration it is included in.

  Args:
    scores: float [num_layers, num_heads] (:func:`retrieval_scores`); NaN: not attention.
    retrieval_fraction, threshold: the selection rule (exactly one).
    streaming_window: tokens a streaming head sees (itself included).
    num_sink_tokens: the first tokens every streaming head keeps (StreamingLLM sinks).
    mixer: the mixer name of the layers configured.
    layer_pattern: the model's ``layer_pattern`` (one name per layer) or None.
    source: provenance written in the header.
  """
  scores = np.asarray(scores, np.float64)
  if not _is_int(streaming_window) or streaming_window < 1:
    raise ValueError(f"per_head_windows_config: streaming_window must be a positive int (the "
                     f"tokens a streaming head sees), got {streaming_window!r}.")
  if not _is_int(num_sink_tokens) or num_sink_tokens < 0:
    raise ValueError(f"per_head_windows_config: num_sink_tokens must be a non-negative int, "
                     f"got {num_sink_tokens!r}.")
  if not isinstance(mixer, str) or not mixer:
    raise ValueError(f"per_head_windows_config: mixer must be a mixer name such as "
                     f"'attention', got {mixer!r}.")
  chosen = select_retrieval_heads(scores, retrieval_fraction=retrieval_fraction,
                                  threshold=threshold)
  if layer_pattern is not None and len(layer_pattern) != scores.shape[0]:
    raise ValueError(f"per_head_windows_config: layer_pattern has {len(layer_pattern)} entries "
                     f"but scores has {scores.shape[0]} layers.")
  rule = (f"the top {retrieval_fraction:.0%} of heads" if threshold is None
          else f"heads scoring >= {threshold:g}")
  finite, note = np.isfinite(scores), tie_note(scores, chosen)
  lines = ["# DuoAttention per-head windows from the retrieval-head probe "
           "(lclm.evals.retrieval_heads).",
           f"# Source: {source}" if source else None,
           f"# Retrieval heads ({rule}: {int(chosen.sum())} of {int(finite.sum())}) keep full "
           "attention (None);",
           f"# the others stream: {num_sink_tokens} sinks + a {streaming_window}-token window.",
           None if note is None else f"# Note: {note}",
           "# Copy-paste scores per layer (heads in order; '-': not an attention head):"]
  lines = [line for line in lines if line is not None]
  entries, skipped = [], []
  for layer, row in enumerate(scores):
    finite = np.isfinite(row)
    text = " ".join(f"{s:.3f}" if f else "-" for s, f in zip(row, finite))
    lines.append(f"#   layer {layer}: {text}")
    if not finite.any():
      continue
    if layer_pattern is not None and layer_pattern[layer] != mixer:
      skipped.append(f"{layer} ({layer_pattern[layer]})")
      continue
    heads = int(np.flatnonzero(finite).max()) + 1
    windows = ", ".join("None" if chosen[layer, h] else str(int(streaming_window))
                        for h in range(heads))
    entries.append(f"    {layer}: {{\"per_head_windows\": [{windows}], "
                   f"\"num_sink_tokens\": {int(num_sink_tokens)}}},")
  if skipped:
    lines.append(f"# Not configured (their mixer is not {mixer!r}): layers {', '.join(skipped)}.")
  if not entries:
    raise ValueError(f"per_head_windows_config: no layer to configure: no scored layer has the "
                     f"mixer {mixer!r}.")
  lines += ["DecoderLM.layer_options = {", *entries, "}"]
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class HeadBudget:
  """DuoAttention's per-head split of a KV-cache budget (:func:`budget_head_windows`).

  Attributes:
    windows: layer -> one entry per query head: None (a retrieval head: every token) or the
      window of a streaming head (tokens it sees, itself included).
    num_sink_tokens: the first tokens every streaming head also keeps.
    full_kv_heads: (layer, kv head) pairs that keep every token, best score first.
    streaming_slots: cache slots of a streaming kv head (sinks + window), 0 if none streams.
  """
  windows: dict[int, list[int | None]]
  num_sink_tokens: int
  full_kv_heads: tuple[tuple[int, int], ...]
  streaming_slots: int

  def layer_options(self) -> dict[int, dict[str, Any]]:
    """``DecoderLM.layer_options`` for the configured layers."""
    return {layer: {"per_head_windows": list(w), "num_sink_tokens": self.num_sink_tokens}
            for layer, w in self.windows.items()}


def budget_head_windows(scores, *, num_kv_heads: int, length: int, budget: int,
                        full_share: float = 0.5, num_sink_tokens: int = 4,
                        layers: Sequence[int] | None = None) -> HeadBudget:
  """Per-head budgets from the probe's scores: DuoAttention at a fixed cache size.

  The configured layers (``layers``, default every layer with finite scores) hold ``N`` key/
  value heads (``num_kv_heads`` each; a key/value head scores the best of its query heads).
  Their cache gets ``S = budget x N`` slots at sequence length ``length``, as an eviction
  policy of ``budget`` slots per head would. ``n = min(N, floor(full_share x S / length))``
  key/value heads of highest score (ties: earlier layer, then head) keep every token; the
  others stream with ``slots = (S - n x length) // (N - n)`` slots each (``n`` lowered until
  that is at least 2): ``min(num_sink_tokens, slots - 1)`` sinks and a window of the rest.
  A streaming key/value head's query heads all get that window (the cache of a group is as
  wide as its widest query head).

  Raises:
    ValueError: scores not [layers, heads] with heads a multiple of ``num_kv_heads``, no
      layer to configure, a budget below 2 slots or above ``length``, ``full_share`` outside
      [0, 1].
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or not _is_int(num_kv_heads) or num_kv_heads < 1 or (
      scores.shape[1] % num_kv_heads):
    raise ValueError(f"budget_head_windows: scores must be [layers, heads] with heads a "
                     f"multiple of num_kv_heads={num_kv_heads!r}, got shape {scores.shape}.")
  if not _is_int(length) or not _is_int(budget) or not 2 <= budget <= length:
    raise ValueError(f"budget_head_windows: budget must be an int in [2, length={length!r}] "
                     f"(cache slots per key/value head), got {budget!r}.")
  if not isinstance(full_share, (int, float)) or not 0 <= full_share <= 1:
    raise ValueError(f"budget_head_windows: full_share must lie in [0, 1], got "
                     f"{full_share!r}.")
  if not _is_int(num_sink_tokens) or num_sink_tokens < 0:
    raise ValueError(f"budget_head_windows: num_sink_tokens must be an int >= 0, got "
                     f"{num_sink_tokens!r}.")
  if layers is None:
    layers = [i for i in range(scores.shape[0]) if np.isfinite(scores[i]).all()]
  layers = sorted(set(int(i) for i in layers))
  if not layers or any(not 0 <= i < scores.shape[0] for i in layers):
    raise ValueError(f"budget_head_windows: no layer to configure (layers {layers}, scores of "
                     f"{scores.shape[0]} layers).")
  group = scores.shape[1] // num_kv_heads
  kv_scores = np.nan_to_num(scores[layers].reshape(len(layers), num_kv_heads, group),
                            nan=-np.inf).max(axis=-1)
  total_heads = kv_scores.size
  total_slots = budget * total_heads
  num_full = min(total_heads, int(math.floor(full_share * total_slots / length + 1e-9)))
  streaming_slots = lambda n: (total_slots - n * length) // (total_heads - n)
  while 0 < num_full < total_heads and streaming_slots(num_full) < 2:
    num_full -= 1  # A streaming head needs a slot for itself and one more.
  order = np.argsort(-kv_scores, axis=None, kind="stable")[:num_full]
  full = [(layers[i // num_kv_heads], int(i % num_kv_heads)) for i in order]
  slots = 0 if num_full == total_heads else streaming_slots(num_full)
  sinks = min(num_sink_tokens, max(0, slots - 1))
  windows = {}
  for layer in layers:
    windows[layer] = [None if (layer, h // group) in full else slots - sinks
                      for h in range(scores.shape[1])]
  return HeadBudget(windows=windows, num_sink_tokens=sinks, full_kv_heads=tuple(full),
                    streaming_slots=slots)


def tie_note(scores, chosen) -> str | None:
  """A sentence when retrieval heads (``chosen``, bool [layers, heads]) and streaming heads tie
  at the cut, so that the choice went by order, not by score; else None."""
  scores, chosen = np.asarray(scores, np.float64), np.asarray(chosen, bool)
  rest = np.isfinite(scores) & ~chosen
  if not chosen.any() or not rest.any() or scores[chosen].min() > scores[rest].max():
    return None
  return (f"heads tie at the cut score {scores[chosen].min():.3f}; the earlier "
          "layers and heads were taken (more examples, or not requiring right answers, may "
          "separate them).")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


__all__ = ["DEFAULT_QUERY_CHUNK_SIZE", "HeadBudget", "RetrievalCounts", "answer_positions",
           "attention_rows", "budget_head_windows", "copy_paste_hits", "layer_mask",
           "needle_mask", "niah_batches", "passkey_batches",
           "per_head_windows_config", "retrieval_counts", "retrieval_scores",
           "select_retrieval_heads", "tie_note", "top_attended_keys"]
