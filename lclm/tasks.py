"""Training tasks: where batches come from and how the held-out evaluation is built.

A task is gin-configurable and offers ``name``, ``vocab_size``, ``seq_len``, ``tokenizer``
(the :class:`lclm.data.tokenizer.Tokenizer` of a text task's inputs; None for token-id tasks
such as MQAR), ``train_iterator(batch_size, seed, seq_len=None)`` (a checkpointable Grain
iterator of batches in the format of :mod:`lclm.data.pipeline`, at ``seq_len`` tokens per row,
default the task's ``seq_len``: progressive length stages ask for other lengths) and
``eval_batches(seq_len, batch_size, num_examples)`` (held-out batches at any length, for
evaluation at the training length and beyond).

Every task takes an optional ``position_transform`` (gin: ``MqarTask.position_transform =
@PoSE()``; see :mod:`lclm.data.position_augmentation`) applied to its *training* batches only;
held-out batches keep their plain positions.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

from lclm.data import (mixture, mqar, passkey, pipeline, synthetic_source, synthetic_tasks,
                       text)
from lclm.data.tokenizer import NUM_SPECIAL_IDS, ByteTokenizer, load_tokenizer


@gin.configurable
class MqarTask:
  """Multi-query associative recall with fresh examples every step (Zoology's recipe).

  Args:
    seq_len: training length.
    vocab_size: keys from the lower half of the ids, values from the upper half.
    num_kv_pairs: key-value pairs per example (all queried unless ``num_queries``).
    num_queries: queries per example; None queries every key.
    gap_alpha: power-law exponent of the query gaps.
    random_non_queries: fill the positions between queries with random tokens (Zoology);
      False fills them with the pad token (no accidental repeats of keys).
    seed: data seed (train and held-out splits use different streams of it).
    position_transform: optional augmentation of the training batches' position ids.
  """

  name = "mqar"
  tokenizer = None  # Token ids, no text.

  def __init__(self, seq_len: int = gin.REQUIRED, *, vocab_size: int = 8192,
               num_kv_pairs: int = 8, num_queries: int | None = None, gap_alpha: float = 0.99,
               random_non_queries: bool = True, seed: int = 0, position_transform=None):
    self.seq_len = seq_len
    self.position_transform = position_transform
    self.vocab_size = vocab_size
    self.seed = seed
    self.config = mqar.MqarConfig(vocab_size=vocab_size, seq_len=seq_len,
                                  num_kv_pairs=num_kv_pairs, num_queries=num_queries,
                                  gap_alpha=gap_alpha, random_non_queries=random_non_queries)

  def train_iterator(self, batch_size: int, seed: int, seq_len: int | None = None):
    config = self.config if seq_len is None else dataclasses.replace(self.config,
                                                                      seq_len=seq_len)
    source = synthetic_source.SyntheticBatchSource(
        mqar.make_mqar_batch, config, batch_size=batch_size, seed=self.seed + seed)
    return pipeline.make_batch_iterator(source, position_transform=self.position_transform)

  def eval_batches(self, seq_len: int, batch_size: int, num_examples: int):
    config = dataclasses.replace(self.config, seq_len=seq_len)
    source = synthetic_source.SyntheticSource(mqar.make_mqar_example, config, seed=self.seed,
                                              split="validation")
    return pipeline.make_eval_batches(source, batch_size=batch_size, seq_len=seq_len,
                                      num_examples=num_examples)


@gin.configurable
class PasskeyTask:
  """Passkey retrieval: a random key hidden at a random depth in filler, asked for at the end.

  Byte-level tokens (vocabulary 259). ``vocab_size`` (the model's vocabulary) defaults to
  259; a larger one fits a pretrained model's embedding (the extra ids never occur).
  """

  name = "passkey"

  def __init__(self, seq_len: int = gin.REQUIRED, *, num_digits: int = 5, seed: int = 0,
               position_transform=None, vocab_size: int | None = None):
    self.seq_len = seq_len
    self.position_transform = position_transform
    self.tokenizer = ByteTokenizer()
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)
                                   or vocab_size < self.tokenizer.vocab_size):
      raise ValueError(f"PasskeyTask.vocab_size={vocab_size!r} must be an int >= "
                       f"{self.tokenizer.vocab_size} (the byte tokens), or None.")
    self.vocab_size = self.tokenizer.vocab_size if vocab_size is None else vocab_size
    self.seed = seed
    self.config = passkey.PasskeyConfig(seq_len=seq_len, num_digits=num_digits)

  def _source(self, seq_len, split):
    config = dataclasses.replace(self.config, seq_len=seq_len)
    return synthetic_source.SyntheticSource(passkey.make_passkey_example, config,
                                            seed=self.seed, split=split)

  def train_iterator(self, batch_size: int, seed: int, seq_len: int | None = None):
    seq_len = self.seq_len if seq_len is None else seq_len
    return pipeline.make_train_iterator(self._source(seq_len, "train"),
                                        batch_size=batch_size, seq_len=seq_len,
                                        seed=self.seed + seed, pack=False,
                                        position_transform=self.position_transform)

  def eval_batches(self, seq_len: int, batch_size: int, num_examples: int):
    return pipeline.make_eval_batches(self._source(seq_len, "validation"),
                                      batch_size=batch_size, seq_len=seq_len,
                                      num_examples=num_examples)


@gin.configurable
class SyntheticTask:
  """Any task of :mod:`lclm.data.synthetic_tasks` (RULER-style needles, key-value retrieval,
  selective copying, induction heads, ListOps, Pathfinder, ...), or a mixture of several.

  gin::

      train.task = @SyntheticTask
      SyntheticTask.seq_len = 1024
      SyntheticTask.task = ["niah_single", "niah_multikey", "variable_tracking"]
      SyntheticTask.weights = {"niah_single": 2, "niah_multikey": 2, "variable_tracking": 1}
      SyntheticTask.vocab_size = 4096
      SyntheticTask.options = {"num_needles": 4}        # fields of the tasks' configs

  Every example is one row (no packing). Training draws needles at random depths (unless
  ``options`` fix one); held-out batches come from the validation stream of each task, the
  tasks' examples one after another (``num_examples`` per task). ``options`` apply to every
  task whose config has the field; a field no task takes is an error. ``vocab_size``: the
  model's vocabulary; token-level tasks use it, tasks with their own vocabulary (passkey,
  ListOps, Pathfinder) must fit in it (default: the largest of theirs).
  ``num_train_examples``: a fixed training set of that many examples per task, repeated in a
  new order every epoch (LRA's rules: 96K ListOps examples), instead of fresh examples.
  """

  def __init__(self, seq_len: int = gin.REQUIRED, *, task=gin.REQUIRED,
               vocab_size: int | None = None, options=None, weights=None, seed: int = 0,
               position_transform=None, num_train_examples: int | None = None):
    names = [task] if isinstance(task, str) else list(task)
    if not names or not all(isinstance(n, str) for n in names):
      raise ValueError(f"SyntheticTask.task must be a task name or a list of them, got {task!r}.")
    self.specs = [synthetic_tasks.get(n) for n in names]
    self.options = dict(options or {})
    taken = set()
    for spec in self.specs:
      taken |= spec.config_fields()
    unknown = sorted(set(self.options) - taken)
    if unknown:
      raise ValueError(f"SyntheticTask.options {unknown}: no task of {names} takes them.")
    if num_train_examples is not None and (isinstance(num_train_examples, bool) or not
                                           isinstance(num_train_examples, int) or
                                           num_train_examples < 1):
      raise ValueError("SyntheticTask.num_train_examples must be a positive int or None, got "
                       f"{num_train_examples!r}.")
    self.num_train_examples = num_train_examples
    self.name = "+".join(names)
    self.seq_len = seq_len
    self.seed = seed
    self.position_transform = position_transform
    self.weights = mixture.normalized_weights(names, weights, owner="SyntheticTask.weights")
    own = [self._config(spec, seq_len, None).vocab_size for spec in self.specs
           if not spec.takes_vocab]
    if vocab_size is None:
      if len(own) < len(self.specs):
        raise ValueError(f"SyntheticTask: {names} include token-level tasks; set "
                         "SyntheticTask.vocab_size (the model's vocabulary).")
      vocab_size = max(own)
    self.vocab_size = vocab_size
    for spec in self.specs:  # Validates sizes and vocabularies at construction.
      self._config(spec, seq_len, vocab_size)

  def _config(self, spec, seq_len, vocab_size):
    options = {k: v for k, v in self.options.items() if k in spec.config_fields()}
    return spec.make_config(seq_len=seq_len, vocab_size=vocab_size, **options)

  def _sources(self, seq_len, split):
    size = {"num_records": self.num_train_examples} if (
        split == "train" and self.num_train_examples) else {}
    return [spec.source(self._config(spec, seq_len, self.vocab_size), seed=self.seed,
                        split=split, **size) for spec in self.specs]

  def train_iterator(self, batch_size: int, seed: int, seq_len: int | None = None):
    seq_len = self.seq_len if seq_len is None else seq_len
    sources = self._sources(seq_len, "train")
    return pipeline.make_train_iterator(
        sources if len(sources) > 1 else sources[0], batch_size=batch_size, seq_len=seq_len,
        seed=self.seed + seed, pack=False, position_transform=self.position_transform,
        mixture_weights=self.weights if len(sources) > 1 else None)

  def eval_batches(self, seq_len: int, batch_size: int, num_examples: int):
    return [batch for source in self._sources(seq_len, "validation")
            for batch in pipeline.make_eval_batches(source, batch_size=batch_size,
                                                    seq_len=seq_len,
                                                    num_examples=num_examples)]


@gin.configurable
class TextTask:
  """Language modelling on local text files (globs) or a TFDS text dataset.

  Documents are packed into rows of ``seq_len`` with segment ids and position restarts.
  Exactly one of ``train_files`` / ``tfds_name`` is given. Evaluation needs a held-out split,
  checked at launch: ``eval_files`` (a glob) with ``train_files``, or the TFDS
  ``eval_split``; ``eval_files="train"`` evaluates on the training files on purpose (an
  explicit opt-in; never a silent fallback).

  Mixtures (ProLong-style): ``train_files`` may be a dict ``{"books": "glob", "web":
  "glob"}`` with ``weights`` ``{"books": 0.3, "web": 0.7}`` (default equal): every source is
  shuffled and repeated on its own and Grain's ``MapDataset.mix`` interleaves their documents
  in those proportions (deterministic given the seed; the iterator state checkpoints as
  usual). ``long_document_factor=k`` with ``long_document_bytes=n`` repeats every training
  document of at least ``n`` UTF-8 bytes ``k`` times in its source (drawn k times more often).

  ``tokenizer`` (gin: ``TextTask.tokenizer = "/path/to/model_folder"``): None or ``"byte"``
  for the byte tokenizer (the default), or a folder / file that
  :func:`lclm.data.tokenizer.load_tokenizer` reads (a Hugging Face ``tokenizer.json`` or a
  SentencePiece ``tokenizer.model``). Every document is framed with the tokenizer's bos and
  eos (those it has). ``vocab_size`` (the model's vocabulary) defaults to the tokenizer's; a
  pretrained model's embedding may be larger (e.g. 128256 rows for a smaller tokenizer), so it
  may be set to any value not below the tokenizer's.

  Text evaluation (``eval_metrics = "text"``): the loop reports loss, perplexity, bits per
  byte (with :meth:`eval_bytes`) and the loss by token position besides the accuracy.
  """

  name = "text"
  eval_metrics = "text"

  def __init__(self, seq_len: int = gin.REQUIRED, *, train_files=None,
               eval_files: str | None = None, tfds_name: str | None = None,
               tfds_feature: str = "text", eval_split: str = "validation", seed: int = 0,
               position_transform=None, tokenizer: str | None = None,
               vocab_size: int | None = None, weights=None,
               long_document_bytes: int | None = None, long_document_factor: int = 1):
    if (train_files is None) == (tfds_name is None):
      raise ValueError("TextTask: give exactly one of train_files (a glob of local text "
                       "files, or a dict name -> glob for a mixture) and tfds_name (a TFDS "
                       "text dataset).")
    if train_files is not None:
      if isinstance(train_files, str):
        if weights is not None:
          raise ValueError("TextTask.weights needs train_files as a dict name -> glob, got "
                           f"the single glob {train_files!r}.")
      elif not isinstance(train_files, dict) or not train_files or not all(
          isinstance(v, str) for v in train_files.values()):
        raise ValueError("TextTask.train_files must be a glob or a non-empty dict name -> "
                         f"glob, got {train_files!r}.")
    elif weights is not None or long_document_factor != 1:
      raise ValueError("TextTask.weights and long_document_factor apply to train_files, not "
                       "to a TFDS dataset.")
    if isinstance(long_document_factor, bool) or not isinstance(long_document_factor, int) or (
        long_document_factor < 1):
      raise ValueError("TextTask.long_document_factor must be an int >= 1, got "
                       f"{long_document_factor!r}.")
    if long_document_factor > 1 and (not isinstance(long_document_bytes, int)
                                     or long_document_bytes < 1):
      raise ValueError("TextTask.long_document_bytes must be a positive int when "
                       f"long_document_factor = {long_document_factor}, got "
                       f"{long_document_bytes!r}.")
    self.seq_len = seq_len
    self.tokenizer = load_tokenizer(tokenizer)
    if vocab_size is not None and (not isinstance(vocab_size, int)
                                   or vocab_size < self.tokenizer.vocab_size):
      raise ValueError(f"TextTask.vocab_size={vocab_size!r} must be an int >= the tokenizer's "
                       f"vocabulary ({self.tokenizer.vocab_size}, {self.tokenizer!r}); or None "
                       "to use the tokenizer's.")
    self.vocab_size = self.tokenizer.vocab_size if vocab_size is None else vocab_size
    self.seed = seed
    self.position_transform = position_transform
    if isinstance(train_files, dict):
      self._train_files = dict(train_files)
      self.mixture_weights = mixture.normalized_weights(list(train_files), weights,
                                                        owner="TextTask.weights")
    else:
      self._train_files = None if train_files is None else {"train": train_files}
      self.mixture_weights = [1.0]
    self._eval_files = eval_files
    self._long = (long_document_bytes, long_document_factor)
    self._tfds_name, self._feature, self._eval_split = tfds_name, tfds_feature, eval_split

  def _train_sources(self) -> list:
    if self._tfds_name is not None:
      return [text.tfds_text_source(self._tfds_name, split="train", feature=self._feature,
                                    tokenizer=self.tokenizer)]
    min_bytes, factor = self._long
    return [mixture.upsample_long_documents(
        text.text_file_source(pattern, tokenizer=self.tokenizer), min_bytes=min_bytes,
        factor=factor) for pattern in self._train_files.values()]

  def _eval_source(self):
    if self._tfds_name is not None:
      return text.tfds_text_source(self._tfds_name, split=self._eval_split,
                                   feature=self._feature, tokenizer=self.tokenizer)
    if self._eval_files == "train":
      documents = [doc for pattern in self._train_files.values()
                   for doc in text.text_file_source(pattern).texts]
      return text.TokenizedTextSource(documents, tokenizer=self.tokenizer)
    return text.text_file_source(self._eval_files, tokenizer=self.tokenizer)

  def train_iterator(self, batch_size: int, seed: int, seq_len: int | None = None):
    sources = self._train_sources()
    return pipeline.make_train_iterator(
        sources if len(sources) > 1 else sources[0], batch_size=batch_size,
        seq_len=self.seq_len if seq_len is None else seq_len, seed=self.seed + seed,
        position_transform=self.position_transform,
        mixture_weights=self.mixture_weights if len(sources) > 1 else None)

  def check_eval_split(self) -> None:
    """Raises ValueError when there is no held-out split: local training files without
    ``eval_files`` (``"train"`` evaluates on the training files on purpose). Training
    calls it at launch; a task built only to generate (experiments.generate) needs none."""
    if self._train_files is not None and self._eval_files is None:
      raise ValueError(
          "TextTask: no evaluation split. Give TextTask.eval_files (a glob of held-out "
          "text files), or eval_files = \"train\" to evaluate on the training files on "
          "purpose.")

  def eval_batches(self, seq_len: int, batch_size: int, num_examples: int):
    self.check_eval_split()
    return pipeline.make_eval_batches(self._eval_source(), batch_size=batch_size,
                                      seq_len=seq_len, pack=True, num_examples=num_examples,
                                      long_examples="split")

  def eval_bytes(self, batch) -> int:
    """UTF-8 bytes of the text the counted targets of ``batch`` encode: each segment's
    targets (where ``loss_mask`` is set) decoded with the tokenizer (special tokens, e.g.
    eos, decode to nothing). The denominator of bits per byte. With the byte tokenizer:
    exactly the number of counted non-special targets (a piece cut inside a UTF-8 character
    still counts its bytes)."""
    targets = np.asarray(batch["targets"])
    mask = np.asarray(batch["loss_mask"]) > 0
    if isinstance(self.tokenizer, ByteTokenizer):
      return int(np.count_nonzero(mask & (targets >= NUM_SPECIAL_IDS)))
    segments = np.asarray(batch["segment_ids"])
    total = 0
    for row in range(targets.shape[0]):
      for segment in np.unique(segments[row][mask[row]]):
        ids = targets[row][mask[row] & (segments[row] == segment)]
        total += len(self.tokenizer.decode(ids).encode("utf-8"))
    return total
