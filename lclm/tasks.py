"""Training tasks: where batches come from and how the held-out evaluation is built.

A task is gin-configurable and offers ``name``, ``vocab_size``, ``seq_len``, ``tokenizer``
(the :class:`lclm.data.tokenizer.Tokenizer` of a text task's inputs; None for token-id tasks
such as MQAR), ``train_iterator(batch_size, seed)`` (a checkpointable Grain iterator of
batches in the format of :mod:`lclm.data.pipeline`) and ``eval_batches(seq_len, batch_size,
num_examples)`` (held-out batches at any length, for evaluation at the training length and
beyond).

Every task takes an optional ``position_transform`` (gin: ``MqarTask.position_transform =
@PoSE()``; see :mod:`lclm.data.position_augmentation`) applied to its *training* batches only;
held-out batches keep their plain positions.
"""

from __future__ import annotations

import dataclasses

import gin

from lclm.data import mqar, passkey, pipeline, synthetic_source, text
from lclm.data.tokenizer import ByteTokenizer, load_tokenizer


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

  def train_iterator(self, batch_size: int, seed: int):
    source = synthetic_source.SyntheticBatchSource(
        mqar.make_mqar_batch, self.config, batch_size=batch_size, seed=self.seed + seed)
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

  def train_iterator(self, batch_size: int, seed: int):
    return pipeline.make_train_iterator(self._source(self.seq_len, "train"),
                                        batch_size=batch_size, seq_len=self.seq_len,
                                        seed=self.seed + seed, pack=False,
                                        position_transform=self.position_transform)

  def eval_batches(self, seq_len: int, batch_size: int, num_examples: int):
    return pipeline.make_eval_batches(self._source(seq_len, "validation"),
                                      batch_size=batch_size, seq_len=seq_len,
                                      num_examples=num_examples)


@gin.configurable
class TextTask:
  """Language modelling on local text files (a glob) or a TFDS text dataset.

  Documents are packed into rows of ``seq_len`` with segment ids and position restarts.
  Exactly one of ``train_files`` / ``tfds_name`` is given; evaluation reads ``eval_files``
  or the TFDS ``eval_split``.

  ``tokenizer`` (gin: ``TextTask.tokenizer = "/path/to/model_folder"``): None or ``"byte"``
  for the byte tokenizer (the default), or a folder / file that
  :func:`lclm.data.tokenizer.load_tokenizer` reads (a Hugging Face ``tokenizer.json`` or a
  SentencePiece ``tokenizer.model``). Every document is framed with the tokenizer's bos and
  eos (those it has). ``vocab_size`` (the model's vocabulary) defaults to the tokenizer's; a
  pretrained model's embedding may be larger (e.g. 128256 rows for a smaller tokenizer), so it
  may be set to any value not below the tokenizer's.
  """

  name = "text"

  def __init__(self, seq_len: int = gin.REQUIRED, *, train_files: str | None = None,
               eval_files: str | None = None, tfds_name: str | None = None,
               tfds_feature: str = "text", eval_split: str = "validation", seed: int = 0,
               position_transform=None, tokenizer: str | None = None,
               vocab_size: int | None = None):
    if (train_files is None) == (tfds_name is None):
      raise ValueError("TextTask: give exactly one of train_files (a glob of local text "
                       "files) and tfds_name (a TFDS text dataset).")
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
    self._train_files, self._eval_files = train_files, eval_files or train_files
    self._tfds_name, self._feature, self._eval_split = tfds_name, tfds_feature, eval_split

  def _source(self, train: bool):
    if self._tfds_name is not None:
      return text.tfds_text_source(self._tfds_name, split="train" if train else self._eval_split,
                                   feature=self._feature, tokenizer=self.tokenizer)
    return text.text_file_source(self._train_files if train else self._eval_files,
                                 tokenizer=self.tokenizer)

  def train_iterator(self, batch_size: int, seed: int):
    return pipeline.make_train_iterator(self._source(True), batch_size=batch_size,
                                        seq_len=self.seq_len, seed=self.seed + seed,
                                        position_transform=self.position_transform)

  def eval_batches(self, seq_len: int, batch_size: int, num_examples: int):
    return pipeline.make_eval_batches(self._source(False), batch_size=batch_size,
                                      seq_len=seq_len, pack=True, num_examples=num_examples,
                                      long_examples="split")
