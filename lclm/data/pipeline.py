"""Grain pipelines from a random-access source to fixed-shape training and evaluation batches.

Every batch is a dict of numpy arrays, all [batch_size, seq_len]:

  inputs        int32    token ids (0 on padding)
  targets       int32    next-token ids (0 on padding)
  loss_mask     float32  1 where the loss counts, 0 elsewhere and always 0 on padding
  segment_ids   int32    1, 2, 3, ... per example packed into the row, 0 on padding
  position_ids  int32    0, 1, 2, ... restarting in every segment, 0 on padding

A token may attend to another only if both have the same nonzero segment id (and, causally, the
other is not later): packed examples never see each other.

Source examples are dicts with ``inputs``, ``targets`` (int [n]) and ``loss_mask`` ([n]); other
keys are ignored. Training pipeline: shard per process -> shuffle (seeded, a new order each
epoch) -> repeat -> cut examples longer than ``seq_len`` -> first-fit pack (Grain's
``FirstFitPackIterDataset``) or pad -> batch. The iterator is a Grain ``DatasetIterator``:
``get_state()`` / ``set_state()`` resume it exactly; save it with Orbax through
``grain.checkpoint.CheckpointHandler`` (args ``grain.checkpoint.CheckpointSave(iterator)`` and
``grain.checkpoint.CheckpointRestore(iterator)``).

Context parallelism: ``balanced_order=(load_balance, num_shards)`` emits every row already
permuted into the load-balanced order of ``lclm.sharding.context_parallelism`` (zigzag or
striped over ``num_shards`` sequence shards), with all five arrays permuted alike, so that
attention needs no reshuffle in the step (``context_parallelism.token_order =
"balanced"``). Only for order-free models (attention without the short convolution).
"""

from __future__ import annotations

import math
from typing import Any

import grain
import jax
import numpy as np

from lclm.data import position_augmentation
from pallas_kernels.ring_attention.layouts import load_balance_permutation

FEATURES = ("inputs", "targets", "loss_mask")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "position_ids")
LONG_EXAMPLE_POLICIES = ("split", "truncate", "error")
_MAX_EVAL_EXAMPLES = 10_000_000


def _select(example: dict[str, Any], features: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """The three sequence features of a source example, plus the scalar ``features`` named
  (e.g. a needle's ``depth``), which evaluation batches carry as [batch] arrays."""
  missing = [k for k in FEATURES + tuple(features) if k not in example]
  if missing:
    raise KeyError(f"Source examples need {FEATURES + tuple(features)}; missing {missing} "
                   f"(have {sorted(example)}).")
  out = {
      "inputs": np.asarray(example["inputs"], np.int32),
      "targets": np.asarray(example["targets"], np.int32),
      "loss_mask": np.asarray(example["loss_mask"], np.uint8),
  }
  if not out["inputs"].shape == out["targets"].shape == out["loss_mask"].shape:
    raise ValueError("inputs, targets and loss_mask must have one shape [n]; got "
                     f"{[v.shape for v in out.values()]}.")
  for name in features:
    value = np.asarray(example[name])
    if value.ndim:
      raise ValueError(f"feature {name!r} must be a scalar per example, got shape "
                       f"{value.shape}.")
    out[name] = value
  return out


class _CutLongExamples(grain.experimental.FlatMapTransform):
  """Drops empty examples and splits (or truncates) those longer than ``seq_len``."""

  def __init__(self, seq_len: int, policy: str):
    self.seq_len = seq_len
    self.policy = policy
    self.max_fan_out = 1 if policy != "split" else 2**31 - 1

  def flat_map(self, element):
    n = len(element["inputs"])
    if n <= self.seq_len:
      return [element] if n else []
    if self.policy == "error":
      raise ValueError(f"An example of {n} tokens is longer than seq_len={self.seq_len}; pass "
                       "long_examples='split' or 'truncate', or raise seq_len.")
    starts = range(0, n, self.seq_len) if self.policy == "split" else [0]
    return [{k: v[s:s + self.seq_len] for k, v in element.items()} for s in starts]


def _pad(element: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One example in one row of the batch format, padded to ``seq_len``, segment id 1."""
  n = len(element["inputs"])
  out = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS if k != "loss_mask"}
  out["inputs"][:n] = element["inputs"]
  out["targets"][:n] = element["targets"]
  out["segment_ids"][:n] = 1
  out["position_ids"][:n] = np.arange(n)
  out["loss_mask"] = np.zeros(seq_len, np.float32)
  out["loss_mask"][:n] = element["loss_mask"] != 0
  for name in element.keys() - set(FEATURES):  # Scalar features ride along.
    out[name] = element[name]
  return out


def _finalize_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A row of ``FirstFitPackIterDataset`` -> the batch format (loss_mask zero on padding)."""
  segment_ids = row["inputs_segment_ids"].astype(np.int32)
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "loss_mask": ((row["loss_mask"] != 0) & (segment_ids > 0)).astype(np.float32),
      "segment_ids": segment_ids,
      "position_ids": row["inputs_positions"].astype(np.int32),
  }


def _shard(ds: grain.MapDataset, shard_options: grain.sharding.ShardOptions) -> grain.MapDataset:
  count, index = shard_options.shard_count, shard_options.shard_index
  if shard_options.drop_remainder:
    ds = ds[:len(ds) // count * count]
  return ds[index::count]


def _rows(ds: grain.IterDataset, *, seq_len: int, pack: bool, num_packing_bins: int, seed: int,
          shuffle_bins: bool, long_examples: str) -> grain.IterDataset:
  """Examples -> rows of ``seq_len`` in the batch format."""
  if long_examples not in LONG_EXAMPLE_POLICIES:
    raise ValueError(f"long_examples must be one of {LONG_EXAMPLE_POLICIES}; got {long_examples!r}.")
  ds = grain.experimental.FlatMapIterDataset(ds, _CutLongExamples(seq_len, long_examples))
  if not pack:
    return ds.map(lambda e: _pad(e, seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: seq_len for k in FEATURES}, num_packing_bins=num_packing_bins,
      seed=seed, shuffle_bins=shuffle_bins)
  return ds.map(_finalize_packed)


def to_balanced_order(batch: dict[str, Any], *, load_balance: str, num_shards: int
                      ) -> dict[str, np.ndarray]:
  """Every [batch, seq_len] array of ``batch`` with its columns in the ``load_balance`` order.

  Column ``j`` of the result is token ``perm[j]`` of the row, with ``perm`` from
  :func:`pallas_kernels.ring_attention.load_balance_permutation`: split into ``num_shards``
  contiguous pieces, piece ``p`` holds what device ``p`` of the context axis works on
  (zigzag: chunks p and 2P-1-p; striped: tokens p, p+P, ...). Positions and segment ids
  travel with their tokens, so causality and RoPE see the true order.
  """
  perm = None
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.ndim != 2:
      raise ValueError(f"to_balanced_order: {name} must be [batch, seq_len], got shape "
                       f"{value.shape}.")
    if perm is None:
      try:
        perm = load_balance_permutation(value.shape[1], num_shards, load_balance)
      except ValueError as error:
        raise ValueError(f"to_balanced_order: {error}") from None
    out[name] = value[:, perm]
  return out


def _balanced(balanced_order):
  """The batch map of a ``balanced_order=(load_balance, num_shards)`` option, or None."""
  if balanced_order is None:
    return None
  if not isinstance(balanced_order, (tuple, list)) or len(balanced_order) != 2:
    raise ValueError("balanced_order must be a pair (load_balance, num_shards), e.g. "
                     f"('zigzag', 4), got {balanced_order!r}.")
  load_balance, num_shards = balanced_order
  if load_balance not in ("zigzag", "striped") or not isinstance(num_shards, int) or (
      num_shards < 1):
    raise ValueError("balanced_order: load_balance must be 'zigzag' or 'striped' and "
                     f"num_shards a positive int, got {balanced_order!r}.")
  return lambda batch: to_balanced_order(batch, load_balance=load_balance,
                                         num_shards=num_shards)


def _check_sizes(batch_size: int, seq_len: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1; got {seq_len}.")


def make_train_dataset(
    source: Any, *, batch_size: int, seq_len: int, seed: int, shuffle: bool = True,
    pack: bool = True, num_epochs: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    num_packing_bins: int | None = None, long_examples: str = "split",
    drop_remainder: bool = True, num_threads: int = 0, prefetch_batches: int = 0,
    position_transform: position_augmentation.PositionTransform | None = None,
    balanced_order: tuple[str, int] | None = None,
    mixture_weights: list[float] | None = None,
) -> grain.IterDataset:
  """The training pipeline as a Grain ``IterDataset`` of batches (see the module docstring).

  Args:
    source: a random-access source (``__len__``, ``__getitem__``) of example dicts; or a
      list of them, mixed with ``mixture_weights``.
    batch_size: rows per batch on this process.
    seq_len: tokens per row.
    seed: shuffle and bin-shuffle seed, in [0, 2**32).
    shuffle: shuffle examples (a new order each epoch) and packed rows.
    pack: first-fit pack several examples per row; else one example per row, padded.
    num_epochs: passes over the (sharded) source; None repeats forever.
    shard_options: this process's shard; default ``grain.sharding.ShardByJaxProcess(True)``
      (``jax.process_index()`` of ``jax.process_count()``, equal shard sizes).
    num_packing_bins: rows packed at once (more bins, less padding); default ``batch_size``.
    long_examples: examples longer than ``seq_len`` are ``"split"`` into consecutive pieces,
      ``"truncate"``d, or raise (``"error"``).
    drop_remainder: drop a last incomplete batch (only reached when ``num_epochs`` is set).
    num_threads: Grain threads reading the source (0 reads in the consuming thread).
    prefetch_batches: batches prepared ahead in a background thread (0: none).
    position_transform: optional ``transform(batch, rng) -> batch`` applied to every batch
      (PoSE, random position offsets: :mod:`lclm.data.position_augmentation`), with Grain's
      ``random_map`` (deterministic from ``seed`` and the transform's own ``seed``; resumes
      with the iterator state). None (default): batches as they are.
    balanced_order: ``(load_balance, num_shards)`` to emit rows in the load-balanced order
      of context parallelism (:func:`to_balanced_order`, after ``position_transform``);
      None (default): natural order.
    mixture_weights: with a list of sources, one positive weight each: each source is
      sharded, shuffled (seed ``seed + k`` for source k) and repeated on its own, then they
      are interleaved by Grain's ``MapDataset.mix`` (deterministic; the realised shares of
      examples follow the weights, before packing) ahead of the rest of the pipeline.
  """
  _check_sizes(batch_size, seq_len)
  balance = _balanced(balanced_order)
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  sources = list(source) if isinstance(source, (list, tuple)) else [source]
  if mixture_weights is not None and len(mixture_weights) != len(sources):
    raise ValueError(f"mixture_weights has {len(mixture_weights)} entries for "
                     f"{len(sources)} sources; give one weight per source.")
  if len(sources) > 1 and mixture_weights is None:
    raise ValueError(f"{len(sources)} sources need mixture_weights (one per source).")
  datasets = []
  for k, one in enumerate(sources):
    ds = _shard(grain.MapDataset.source(one), shard_options)
    if len(ds) == 0:
      raise ValueError(f"Shard {shard_options.shard_index} of {shard_options.shard_count} of "
                       f"a source of {len(one)} examples is empty.")
    if shuffle:
      ds = ds.shuffle(seed=seed + k)  # Source k of a mixture: its own order.
    datasets.append(ds.repeat(num_epochs))
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
      datasets, [float(w) for w in mixture_weights])
  ds = ds.map(_select)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(1, 4 * batch_size)))
  ds = _rows(ds, seq_len=seq_len, pack=pack, num_packing_bins=num_packing_bins or batch_size,
             seed=seed, shuffle_bins=shuffle, long_examples=long_examples)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if position_transform is not None:
    ds = ds.random_map(position_transform,
                       seed=position_augmentation.transform_seed(position_transform, seed))
  if balance is not None:
    ds = ds.map(balance)
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


def make_train_iterator(source: Any, *, batch_size: int, seq_len: int, seed: int,
                        shuffle: bool = True, pack: bool = True, num_epochs: int | None = None,
                        **kwargs: Any) -> grain.DatasetIterator:
  """A checkpointable iterator of training batches; keyword arguments as ``make_train_dataset``.

  ``it.get_state()`` is a JSON-serialisable dict; ``fresh.set_state(state)`` makes a new
  iterator of the same pipeline continue exactly where ``it`` was.
  """
  return iter(make_train_dataset(source, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                 shuffle=shuffle, pack=pack, num_epochs=num_epochs, **kwargs))


def _full_rows(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """A generated batch of fixed-length examples -> the batch format (one segment per row)."""
  inputs = np.asarray(batch["inputs"], np.int32)
  rows, length = inputs.shape
  return {
      "inputs": inputs,
      "targets": np.asarray(batch["targets"], np.int32),
      "loss_mask": (np.asarray(batch["loss_mask"]) != 0).astype(np.float32),
      "segment_ids": np.ones((rows, length), np.int32),
      "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
  }


def make_batch_iterator(batch_source: Any, *,
                        shard_options: grain.sharding.ShardOptions | None = None,
                        prefetch_batches: int = 0,
                        position_transform: position_augmentation.PositionTransform | None
                        = None, balanced_order: tuple[str, int] | None = None
                        ) -> grain.DatasetIterator:
  """A checkpointable iterator over a source of whole batches (``SyntheticBatchSource``).

  Process ``p`` of ``n`` reads records ``p, p + n, p + 2n, ...``; every row is one full-length
  example (segment id 1, positions ``0..T-1``). Same batch format and state API as
  ``make_train_iterator``; ``position_transform`` as in ``make_train_dataset`` (seeded by the
  transform's own ``seed``); ``balanced_order`` as there too.
  """
  balance = _balanced(balanced_order)
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  ds = _shard(grain.MapDataset.source(batch_source), shard_options).map(_full_rows)
  if position_transform is not None:
    ds = ds.random_map(position_transform,
                       seed=position_augmentation.transform_seed(position_transform))
  if balance is not None:
    ds = ds.map(balance)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return iter(ds)


def _empty_rows(num_rows: int, seq_len: int, features: dict[str, np.dtype] | None = None
                ) -> dict[str, np.ndarray]:
  """Rows that count nothing; scalar ``features`` (name -> dtype) are 0 in them."""
  rows = {k: np.zeros((num_rows, seq_len), np.float32 if k == "loss_mask" else np.int32)
          for k in BATCH_KEYS}
  rows.update({k: np.zeros((num_rows,), dtype) for k, dtype in (features or {}).items()})
  return rows


def pad_batch_count(batches: list[dict[str, np.ndarray]], count: int, *, batch_size: int,
                    seq_len: int, features: dict[str, Any] | None = None
                    ) -> list[dict[str, np.ndarray]]:
  """``batches`` followed by empty batches up to ``count`` batches in all.

  An empty batch is ``[batch_size, seq_len]`` of zeros (``loss_mask`` 0, ``segment_ids``
  0; scalar ``features``, name -> dtype, 0): it counts nothing. Raises ValueError when ``count`` is below ``len(batches)``.
  """
  if count < len(batches):
    raise ValueError(f"pad_batch_count: count={count} is below the {len(batches)} batches "
                     "given; pass the largest count of all processes.")
  return list(batches) + [_empty_rows(batch_size, seq_len, features)
                          for _ in range(count - len(batches))]


def agreed_batch_count(local_count: int) -> int:
  """The largest ``local_count`` of all processes (itself with one process).

  A collective when ``jax.process_count() > 1``: every process must call it.
  """
  if jax.process_count() == 1:
    return int(local_count)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.asarray(local_count, np.int64))
  return int(np.max(counts))


def make_eval_batches(source: Any, *, batch_size: int, seq_len: int, pack: bool = False,
                      num_examples: int | None = None,
                      shard_options: grain.sharding.ShardOptions | None = None,
                      long_examples: str = "error",
                      num_threads: int = 0,
                      features: dict[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
  """All evaluation batches of this process, in source order, in the batch format.

  The first ``num_examples`` examples (default: all) are read once, unshuffled; with
  ``pack=False`` each row holds one example. The last batch is completed with empty rows
  (``loss_mask`` 0, ``segment_ids`` 0), and every process gets the same number of batches
  (completed with empty batches), so multi-host evaluation stays in lockstep: with one
  example per row (no packing, no split) that number follows from the shard sizes; packed
  or split rows depend on the data, so with several jax processes the processes agree on
  the largest count (:func:`agreed_batch_count`, a collective that every process reaches).

  Args:
    source: a random-access source of example dicts.
    batch_size: rows per batch on this process.
    seq_len: tokens per row.
    pack: pack several examples per row (first fit, in order).
    num_examples: evaluate on ``source[:num_examples]``.
    shard_options: default ``grain.sharding.ShardByJaxProcess()`` (remainder spread over the
      first shards).
    long_examples: as in ``make_train_dataset``; by default a too-long example raises.
    num_threads: Grain threads reading the source.
    features: scalar features of the source examples to keep (name -> numpy dtype, e.g.
      ``{"depth": np.float32}``), as [batch_size] arrays beside the batch format (0 in empty
      rows). Only with one example per row (``pack=False``, ``long_examples="error"``).
  """
  _check_sizes(batch_size, seq_len)
  features = dict(features or {})
  if features and (pack or long_examples != "error"):
    raise ValueError("make_eval_batches: features need one whole example per row "
                     "(pack=False, long_examples='error').")
  if num_examples is None and len(source) > _MAX_EVAL_EXAMPLES:
    raise ValueError(f"The source has {len(source)} examples; pass num_examples to evaluate on "
                     "its first ones.")
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=False)
  ds = grain.MapDataset.source(source)
  total = len(ds) if num_examples is None else min(num_examples, len(ds))
  ds = _shard(ds[:total], shard_options).map(
      lambda e: {**_select(e, tuple(features)),
                 **{k: np.asarray(e[k], dtype) for k, dtype in features.items()}})
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
  ds = _rows(ds, seq_len=seq_len, pack=pack, num_packing_bins=batch_size,
             seed=0, shuffle_bins=False, long_examples=long_examples)
  batches = list(ds.batch(batch_size, drop_remainder=False))
  if batches and len(batches[-1]["inputs"]) < batch_size:
    pad = _empty_rows(batch_size - len(batches[-1]["inputs"]), seq_len, features)
    batches[-1] = {k: np.concatenate([batches[-1][k], pad[k]]) for k in pad}
  if not pack and long_examples != "split":
    per_shard = math.ceil(total / shard_options.shard_count)
    count = max(len(batches), math.ceil(per_shard / batch_size))
  else:
    count = agreed_batch_count(len(batches))
  return pad_batch_count(batches, count, batch_size=batch_size, seq_len=seq_len,
                         features=features)
