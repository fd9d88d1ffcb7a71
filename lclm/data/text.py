"""Language-modelling sources from text: local files or any TFDS text dataset, tokenized.

The tokenizer is any :class:`lclm.data.tokenizer.Tokenizer` (default the byte tokenizer; a
Hugging Face ``tokenizer.json`` or a SentencePiece model through ``load_tokenizer``). Each
document becomes one example ``inputs = ids[:-1]``, ``targets = ids[1:]``, ``loss_mask`` all
ones, where ``ids`` is the document's tokens with bos/eos added. Documents may be longer than the
training length: the pipeline cuts them into pieces (``long_examples="split"``, the default).
"""

from __future__ import annotations

import glob as glob_lib
from collections.abc import Sequence
from typing import Any

import numpy as np

from lclm.data import tokenizer as tokenizer_lib


class TokenizedTextSource:
  """A Grain ``RandomAccessDataSource`` of tokenized documents.

  Args:
    texts: random-access sequence of documents (``str`` or UTF-8 ``bytes``).
    tokenizer: any :class:`~lclm.data.tokenizer.Tokenizer`; defaults to ``ByteTokenizer()``.
    add_bos, add_eos: frame every document with bos / eos. None (default): when the tokenizer
      has that token (every lclm tokenizer has both except some real vocabularies, e.g. Qwen's
      has no bos); True with a tokenizer that lacks it is a ValueError.

  ``source[i]`` is ``{"inputs", "targets": int32 [n - 1], "loss_mask": uint8 [n - 1]}`` for a
  document of ``n`` tokens.
  """

  def __init__(self, texts: Sequence[Any], *, tokenizer: tokenizer_lib.Tokenizer | None = None,
               add_bos: bool | None = None, add_eos: bool | None = None):
    self.texts = texts
    self.tokenizer = tokenizer if tokenizer is not None else tokenizer_lib.ByteTokenizer()
    for name, asked, special in (("add_bos", add_bos, self.tokenizer.bos_id),
                                 ("add_eos", add_eos, self.tokenizer.eos_id)):
      if asked and special is None:
        raise ValueError(f"TokenizedTextSource: {name}=True but the tokenizer {self.tokenizer!r} "
                         f"has no such token; pass {name}=None or False.")
    self.add_bos = self.tokenizer.bos_id is not None if add_bos is None else add_bos
    self.add_eos = self.tokenizer.eos_id is not None if add_eos is None else add_eos

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    text = self.texts[int(index)]
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    ids = self.tokenizer.encode(text, add_bos=self.add_bos, add_eos=self.add_eos)
    n = max(len(ids) - 1, 0)
    return {"inputs": ids[:n], "targets": ids[1:n + 1], "loss_mask": np.ones(n, np.uint8)}


def text_file_source(pattern: str, *, document_separator: str | None = None,
                     tokenizer: tokenizer_lib.Tokenizer | None = None) -> TokenizedTextSource:
  """Documents from the files matching the glob ``pattern`` (sorted by path), held in memory.

  ``document_separator=None`` makes each file one document; ``"\\n"`` makes each line one,
  ``"\\n\\n"`` each paragraph. Empty documents are dropped. ``tokenizer``: default bytes.
  """
  paths = sorted(glob_lib.glob(pattern, recursive=True))
  if not paths:
    raise ValueError(f"No file matches the text pattern {pattern!r}.")
  documents = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      content = f.read()
    parts = [content] if document_separator is None else content.split(document_separator)
    documents.extend(p for p in parts if p.strip())
  return TokenizedTextSource(documents, tokenizer=tokenizer)


class _FeatureColumn:
  """Random access to one feature of a TFDS data source."""

  def __init__(self, data_source: Any, feature: str):
    self.data_source = data_source
    self.feature = feature

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> Any:
    record = self.data_source[index]
    if self.feature not in record:
      raise KeyError(f"TFDS record has no feature {self.feature!r}; it has {sorted(record)}.")
    return record[self.feature]


def tfds_text_source(name: str, *, split: str = "train", feature: str = "text",
                     data_dir: str | None = None, download: bool = False,
                     tokenizer: tokenizer_lib.Tokenizer | None = None) -> TokenizedTextSource:
  """Documents from the text ``feature`` of the TFDS dataset ``name`` (e.g. ``"lm1b"``).

  Reads the dataset's array_record files through ``tfds.data_source`` (no TensorFlow). With
  ``download=False`` the dataset must already be prepared in ``data_dir``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  return TokenizedTextSource(_FeatureColumn(data_source, feature), tokenizer=tokenizer)
