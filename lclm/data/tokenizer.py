"""Tokenizers: the byte-level default and wrappers of real vocabularies.

* :class:`ByteTokenizer`: UTF-8 bytes shifted past three special ids; needs no file. The
  default of every task (synthetic tasks and byte-level text).
* :class:`HFTokenizer`: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), with
  its bos / eos / pad ids read from the files beside it.
* :class:`SentencePieceTokenizer`: a SentencePiece ``tokenizer.model``.
* :func:`load_tokenizer`: one of them from ``None`` / ``"byte"`` or a path (gin: the
  ``TextTask.tokenizer`` option of :mod:`lclm.tasks`).

All of them follow the :class:`Tokenizer` protocol: ``encode`` never adds special tokens by
itself (``add_bos`` / ``add_eos`` say so explicitly) and ``decode`` drops special tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL_IDS = 3

HF_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


@runtime_checkable
class Tokenizer(Protocol):
  """What the data sources and generation need of a tokenizer.

  Attributes:
    vocab_size: number of ids the tokenizer can produce (ids lie in ``[0, vocab_size)``). A
      model's embedding may be larger (e.g. padded to a multiple of 128), never smaller.
    pad_id, bos_id, eos_id: special ids, or None where the vocabulary has no such token.
    eos_ids: every id that ends a sequence (``eos_id`` first); generation stops on any.
  """

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int | None: ...

  @property
  def bos_id(self) -> int | None: ...

  @property
  def eos_id(self) -> int | None: ...

  @property
  def eos_ids(self) -> tuple[int, ...]: ...

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 ids [num_tokens (+1 per added special)] of ``text``; no special token unless asked."""
    ...

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of ``ids`` with special tokens dropped."""
    ...


def _check_ids(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
  """ids as int64 [n]; ValueError if any lies outside [0, vocab_size)."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"ids must lie in [0, {vocab_size}); got values in "
                     f"[{ids.min()}, {ids.max()}].")
  return ids


def _frame(ids: np.ndarray, bos_id: int | None, eos_id: int | None, add_bos: bool,
           add_eos: bool, name: str) -> np.ndarray:
  """int32 ``[bos] + ids + [eos]`` as asked; ValueError if the vocabulary lacks the token."""
  ids = np.asarray(ids, dtype=np.int32).reshape(-1)
  for asked, special, what in ((add_bos, bos_id, "bos"), (add_eos, eos_id, "eos")):
    if asked and special is None:
      raise ValueError(f"{name}.encode: add_{what}=True but this tokenizer has no {what} "
                       "token (none in its files); pass add_" + what + "=False.")
  parts = ([np.array([bos_id], np.int32)] if add_bos else []) + [ids]
  if add_eos:
    parts.append(np.array([eos_id], np.int32))
  return np.concatenate(parts) if len(parts) > 1 else ids


class ByteTokenizer:
  """Maps text to ids ``byte + 3``; ids 0, 1, 2 are pad, bos and eos.

  ``vocab_size`` is 259. Any text round-trips: ``decode(encode(s)) == s``.
  """

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  eos_ids = (EOS_ID,)

  @property
  def vocab_size(self) -> int:
    return 256 + NUM_SPECIAL_IDS

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """Returns int32 ids [num_bytes (+1 per added special)] of the UTF-8 bytes of ``text``."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL_IDS
    return _frame(data, BOS_ID, EOS_ID, add_bos, add_eos, "ByteTokenizer")

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Returns the text of ``ids``; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = _check_ids(ids, self.vocab_size)
    data = (ids[ids >= NUM_SPECIAL_IDS] - NUM_SPECIAL_IDS).astype(np.uint8)
    return data.tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _read_json(path: str) -> dict:
  """The JSON object in ``path``, or {} when the file does not exist."""
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    content = json.load(f)
  if not isinstance(content, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}.")
  return content


def _token_content(entry: Any) -> str | None:
  """A special token as written in tokenizer_config.json / special_tokens_map.json: a string
  or an AddedToken dict ``{"content": ..., ...}``; None when absent."""
  if isinstance(entry, dict):
    entry = entry.get("content")
  return entry if isinstance(entry, str) and entry else None


def _id_list(value: Any) -> list[int]:
  """``bos_token_id`` / ``eos_token_id`` of a config.json: an int, a list of ints, or null."""
  if value is None:
    return []
  values = value if isinstance(value, (list, tuple)) else [value]
  return [int(v) for v in values if v is not None]


class HFTokenizer:
  """A Hugging Face fast tokenizer (``tokenizer.json``) with explicit bos / eos.

  Args:
    path: a folder holding ``tokenizer.json`` or the path of such a JSON file. The special
      tokens are read from the files of the same folder, the first that names them winning:
      ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``: strings or
      AddedToken dicts), then ``special_tokens_map.json``, then the ids of ``config.json``
      (``bos_token_id``, ``eos_token_id``, ``pad_token_id``).

  ``eos_ids`` gathers every end-of-sequence id, in order: the tokenizer's own eos token, then
  the ``eos_token_id`` of ``config.json`` and of ``generation_config.json`` (an int or a list,
  e.g. Llama 3's ``[128001, 128008, 128009]``). ``eos_id`` is the first of them: the token
  that ``encode(..., add_eos=True)`` appends. A token the files do not name is None (``eos_ids``
  then empty); asking to add it is a ValueError.

  ``vocab_size`` is the tokenizer's size including added tokens (``len(AutoTokenizer)``); a
  model's embedding may be larger. ``encode`` never adds the special tokens of the tokenizer's
  post-processor (``add_special_tokens=False``): ``add_bos`` / ``add_eos`` are explicit, as for
  :class:`ByteTokenizer`. ``decode`` skips special tokens. Instances pickle (Grain workers).
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    file = os.path.join(path, HF_TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"HFTokenizer: no tokenizer file at {file!r}; path must be a "
                              f"folder holding {HF_TOKENIZER_FILE} or such a JSON file.")
    self.path = file
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(file)
    except Exception as error:  # The Rust library raises its own exception type.
      raise ValueError(f"HFTokenizer: {file!r} is not a Hugging Face tokenizer.json: "
                       f"{error}") from error
    folder = os.path.dirname(os.path.abspath(file))
    tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
    model_config = _read_json(os.path.join(folder, "config.json"))
    generation_config = _read_json(os.path.join(folder, "generation_config.json"))

    def named_id(kind: str) -> tuple[int | None, bool]:
      """(id, whether the tokenizer files name it): an explicit ``null`` (Qwen's bos) names
      "no such token", which config.json's ids must not override."""
      for source in (tokenizer_config, special_map):
        if f"{kind}_token" not in source:
          continue
        token = _token_content(source[f"{kind}_token"])
        if token is None:
          return None, True
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
          raise ValueError(f"HFTokenizer: {kind}_token {token!r} named in {folder} is not "
                           f"in the vocabulary of {file}.")
        return int(token_id), True
      return None, False

    def first_id(ids):
      return next(iter(_id_list(ids)), None)

    bos, named = named_id("bos")
    self.bos_id = bos if named else first_id(model_config.get("bos_token_id"))
    eos_ids = [named_id("eos")[0]] + _id_list(model_config.get("eos_token_id")) + _id_list(
        generation_config.get("eos_token_id"))
    self.eos_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
    self.eos_id = self.eos_ids[0] if self.eos_ids else None
    pad, named = named_id("pad")
    self.pad_id = pad if named else first_id(model_config.get("pad_token_id"))

  @property
  def vocab_size(self) -> int:
    return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 ids [num_tokens (+1 per added special)] of ``text``; bos / eos only when asked."""
    ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    return _frame(np.asarray(ids, np.int32), self.bos_id, self.eos_id, add_bos, add_eos,
                  "HFTokenizer")

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of ``ids`` (in [0, vocab_size)) without special tokens."""
    ids = _check_ids(ids, self.vocab_size)
    return self._tokenizer.decode(ids.tolist(), skip_special_tokens=True)

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id})")


class SentencePieceTokenizer:
  """A SentencePiece model (``tokenizer.model``: Llama 1/2, Mistral, T5, Gemma ...).

  Args:
    path: a folder holding ``tokenizer.model`` or the path of a SentencePiece model file.

  bos / eos / pad ids are the model's own (``bos_id()``, ``eos_id()``, ``pad_id()``); one the
  model lacks (SentencePiece says -1; most models have no pad) is None here, not replaced by
  another token: a caller that needs a filler id uses ``eos_id`` or 0 itself (the lclm
  pipelines pad with 0 under a zero loss mask and never read ``pad_id``). ``eos_ids`` is
  ``(eos_id,)`` or empty. ``encode`` adds no bos / eos unless asked; ``decode`` drops control
  tokens (bos, eos, pad). ``vocab_size`` is the model's piece count.
  """

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    file = os.path.join(path, SENTENCEPIECE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"SentencePieceTokenizer: no model file at {file!r}; path must "
                              f"be a folder holding {SENTENCEPIECE_FILE} or a SentencePiece "
                              "model file.")
    self.path = file
    processor = sentencepiece.SentencePieceProcessor()
    try:
      processor.Load(file)
    except (OSError, RuntimeError) as error:
      raise ValueError(f"SentencePieceTokenizer: {file!r} is not a SentencePiece model: "
                       f"{error}") from error
    self._processor = processor

    def special(value: int) -> int | None:
      return int(value) if value >= 0 else None

    self.bos_id = special(processor.bos_id())
    self.eos_id = special(processor.eos_id())
    self.pad_id = special(processor.pad_id())
    self.eos_ids = () if self.eos_id is None else (self.eos_id,)

  @property
  def vocab_size(self) -> int:
    return int(self._processor.get_piece_size())

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 ids [num_pieces (+1 per added special)] of ``text``; bos / eos only when asked."""
    ids = self._processor.encode(text, out_type=int)
    return _frame(np.asarray(ids, np.int32), self.bos_id, self.eos_id, add_bos, add_eos,
                  "SentencePieceTokenizer")

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of ``ids`` (in [0, vocab_size)); control tokens (bos, eos, pad) are dropped."""
    return self._processor.decode(_check_ids(ids, self.vocab_size).tolist())

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


def load_tokenizer(path_or_name: str | os.PathLike | None = None) -> Tokenizer:
  """The tokenizer named by ``path_or_name``.

  * ``None`` or ``"byte"``: :class:`ByteTokenizer`.
  * a folder: its ``tokenizer.json`` (:class:`HFTokenizer`) when present, else its
    ``tokenizer.model`` (:class:`SentencePieceTokenizer`).
  * a file ending ``.json`` (HFTokenizer) or ``.model`` (SentencePieceTokenizer).

  Raises FileNotFoundError for a path that does not exist or a folder with neither file, and
  ValueError for a file of another kind. Nothing is downloaded: a Hub model name must first be
  fetched into a folder (e.g. ``huggingface-cli download NAME --local-dir DIR``).
  """
  if path_or_name is None or (isinstance(path_or_name, str) and path_or_name == "byte"):
    return ByteTokenizer()
  path = os.fspath(path_or_name)
  if os.path.isdir(path):
    for name, kind in ((HF_TOKENIZER_FILE, HFTokenizer),
                       (SENTENCEPIECE_FILE, SentencePieceTokenizer)):
      if os.path.isfile(os.path.join(path, name)):
        return kind(path)
    raise FileNotFoundError(f"load_tokenizer: the folder {path!r} holds neither "
                            f"{HF_TOKENIZER_FILE} nor {SENTENCEPIECE_FILE}.")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"load_tokenizer: {path!r} is neither 'byte' nor an existing path; give 'byte', a "
        f"folder holding {HF_TOKENIZER_FILE} or {SENTENCEPIECE_FILE}, or such a file.")
  if path.endswith(".json"):
    return HFTokenizer(path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise ValueError(f"load_tokenizer: {path!r} is a file of unknown kind; expected a "
                   "tokenizer.json (*.json) or a SentencePiece model (*.model).")

