"""The sequence layout shared by the Long Range Arena tasks, and loaders for its data-backed tasks
(Text, Image, Retrieval) that read data the user already has: nothing is ever downloaded.

Every LRA example is a classification cast as next-token prediction. Its ``seq_len + 1`` tokens
are left-padded so that the answer always sits at the very end:

  s = PAD ... PAD  BOS  x_1 ... x_n  ANSWER  label          (len(s) = seq_len + 1)

``inputs = s[:-1]``, ``targets = s[1:]`` (int32 [seq_len]) and ``loss_mask`` (uint8 [seq_len]) is
1 only at the last position, where the input is ANSWER and the target the class token
``label_base + c``. Left padding keeps the content right before the question, so a model is not
also asked to carry its answer across a stretch of padding (which would penalise recurrent models
on short inputs); the PAD tokens are ordinary inputs under a zero loss mask. With ``n = seq_len -
2`` there is no padding at all. Every example also carries its class as the scalar feature
``label`` (int32).

Content ids lie in ``[FIRST_FREE_ID, label_base)`` (``lclm.data.token_layout``), so they never
collide with the markers, and the class tokens follow them:

* Text (IMDB reviews, :func:`lra_text_source`): byte ``b`` of the UTF-8 text is id
  ``FIRST_FREE_ID + b`` (the ``ByteTokenizer`` id shifted by ``FIRST_FREE_ID - 3``, past the
  markers), reviews cut to their first ``seq_len - 2`` bytes; classes 0 (negative) and 1
  (positive) are ids 272 and 273 (``BYTE_LABEL_BASE``); ``vocab_size`` 274.
* Retrieval (AAN citation pairs, :func:`lra_retrieval_source`): the same byte ids,
  ``BOS doc_1 SEP doc_2 ANSWER label`` with each document cut to ``(seq_len - 3) // 2`` bytes;
  class 1 when the papers cite each other; ``vocab_size`` 274.
* Image (CIFAR-10, :func:`lra_image_source`): the grayscale image (LRA's conversion, see
  :func:`grayscale`) row by row, pixel value ``v`` as id ``FIRST_FREE_ID + v``; 1024 pixels, so
  ``seq_len`` is 1026 with no padding; classes 0..9 are ids 272..281; ``vocab_size`` 282.

Each loader returns a random-access source (``len``, ``source[i]``; Grain reads it as a
``RandomAccessDataSource``). Missing data raises ``FileNotFoundError`` saying what is missing,
where it was looked for and how to prepare it once on a machine with network access.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from lclm.data import token_layout

NUM_BYTES = 256
BYTE_LABEL_BASE = token_layout.FIRST_FREE_ID + NUM_BYTES  # 272: class tokens of Text/Retrieval.
BYTE_VOCAB_SIZE = BYTE_LABEL_BASE + 2
IMAGE_SIZE = 32
IMAGE_NUM_CLASSES = 10
IMAGE_SEQ_LEN = IMAGE_SIZE * IMAGE_SIZE + 2  # BOS + 1024 pixels + ANSWER, then the label.
IMAGE_LABEL_BASE = token_layout.FIRST_FREE_ID + NUM_BYTES
IMAGE_VOCAB_SIZE = IMAGE_LABEL_BASE + IMAGE_NUM_CLASSES
TEXT_SEQ_LEN = 4096
RETRIEVAL_SEQ_LEN = 4000
# tf.image.rgb_to_grayscale's weights (ITU-R BT.601 luma), which LRA's image pipeline used.
GRAYSCALE_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)

# Scalar features of the examples (name -> dtype).
TEXT_FEATURES = {"label": np.int32, "length": np.int32}
IMAGE_FEATURES = {"label": np.int32}
RETRIEVAL_FEATURES = {"label": np.int32, "length1": np.int32, "length2": np.int32}

RETRIEVAL_SPLITS = {"train": "train", "eval": "eval", "validation": "eval", "test": "test"}
RETRIEVAL_FILE = "new_aan_pairs.{}.tsv"


def classification_example(content: np.ndarray, label_token: int, seq_len: int
                           ) -> dict[str, np.ndarray]:
  """The training form of ``PAD ... PAD BOS content ANSWER label_token`` (``seq_len + 1`` tokens).

  Args:
    content: int [n] token ids, ``n <= seq_len - 2``.
    label_token: the class token, the target at the last position.
    seq_len: length of ``inputs`` / ``targets``.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len] and ``loss_mask`` uint8 [seq_len], 1 only at the last
    position (input ANSWER, target ``label_token``).
  """
  content = np.asarray(content).reshape(-1)
  n = len(content)
  if n > seq_len - 2:
    raise ValueError(f"content of {n} tokens does not fit seq_len={seq_len} (BOS, ANSWER and the "
                     f"label take 3 of its seq_len + 1 tokens); use seq_len >= {n + 2}.")
  seq = np.full(seq_len + 1, token_layout.PAD, np.int32)
  seq[seq_len - 2 - n] = token_layout.BOS
  seq[seq_len - 1 - n:seq_len - 1] = content
  seq[seq_len - 1] = token_layout.ANSWER
  seq[seq_len] = label_token
  return token_layout.shifted(seq, seq_len, seq_len + 1)


def content_tokens(inputs: np.ndarray) -> np.ndarray:
  """int32 [n]: the content of an example's ``inputs`` (between its BOS and the final ANSWER)."""
  inputs = np.asarray(inputs)
  bos = np.flatnonzero(inputs == token_layout.BOS)
  if not len(bos) or inputs[-1] != token_layout.ANSWER:
    raise ValueError("inputs must follow the LRA layout PAD.. BOS content ANSWER; got "
                     f"{len(bos)} BOS tokens and last token {int(inputs[-1])}.")
  return inputs[bos[0] + 1:-1].astype(np.int32)


def _check_label(label: Any, num_classes: int, what: str) -> int:
  label = int(label)
  if not 0 <= label < num_classes:
    raise ValueError(f"{what}: label must be in [0, {num_classes}); got {label}.")
  return label


def _as_bytes(text: str | bytes, what: str) -> bytes:
  if isinstance(text, str):
    return text.encode("utf-8")
  if isinstance(text, (bytes, bytearray, np.bytes_)):
    return bytes(text)
  raise ValueError(f"{what}: text must be str or bytes; got {type(text).__name__}.")


def byte_tokens(text: str | bytes, limit: int | None = None) -> np.ndarray:
  """int32 [min(num_bytes, limit)]: UTF-8 byte ``b`` of ``text`` as id ``FIRST_FREE_ID + b``."""
  data = np.frombuffer(_as_bytes(text, "byte_tokens")[:limit], np.uint8)
  return data.astype(np.int32) + token_layout.FIRST_FREE_ID


def decode_bytes(tokens: np.ndarray) -> str:
  """The text of byte tokens (ids in ``[FIRST_FREE_ID, FIRST_FREE_ID + 256)``); other ids, markers
  and class tokens, are dropped; invalid UTF-8 becomes U+FFFD."""
  tokens = np.asarray(tokens).reshape(-1)
  keep = tokens[(tokens >= token_layout.FIRST_FREE_ID) & (tokens < BYTE_LABEL_BASE)]
  return (keep - token_layout.FIRST_FREE_ID).astype(np.uint8).tobytes().decode(
      "utf-8", errors="replace")


def imdb_example(text: str | bytes, label: int, seq_len: int = TEXT_SEQ_LEN
                 ) -> dict[str, np.ndarray]:
  """One LRA Text example: an IMDB review and its sentiment.

  Args:
    text: the review (str, or UTF-8 bytes as TFDS gives it).
    label: 0 (negative) or 1 (positive).
    seq_len: length of ``inputs`` / ``targets``, >= 3; the review keeps its first
      ``seq_len - 2`` bytes.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len], ``loss_mask`` uint8 [seq_len] (see the module
    layout), ``label`` int32 [] and ``length`` int32 [] (bytes of the whole review, before the
    cut).
  """
  if seq_len < 3:
    raise ValueError(f"imdb_example: seq_len must be >= 3; got {seq_len}.")
  label = _check_label(label, 2, "imdb_example")
  data = _as_bytes(text, "imdb_example")
  example = classification_example(byte_tokens(data, seq_len - 2), BYTE_LABEL_BASE + label,
                                    seq_len)
  return {**example, "label": np.int32(label), "length": np.int32(len(data))}


def grayscale(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W]: the grayscale of an RGB uint8 [H, W, 3] image as LRA computed it.

  LRA's pipeline called ``tf.image.rgb_to_grayscale``: float32 pixels ``x * (1 / 255)``, luma
  weights (0.2989, 0.5870, 0.1140), then back to uint8 by ``trunc(y * 255.5)`` (TensorFlow's
  ``convert_image_dtype``); reproduced here in float32 without TensorFlow. A [H, W] or [H, W, 1]
  image is already gray and is returned as is.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"grayscale: image must be uint8; got {image.dtype}.")
  if image.ndim == 2:
    return image
  if image.ndim == 3 and image.shape[-1] == 1:
    return image[..., 0]
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"grayscale: image must be [H, W, 3], [H, W, 1] or [H, W]; got shape "
                     f"{image.shape}.")
  luma = (image.astype(np.float32) * np.float32(1.0 / 255.0)) @ GRAYSCALE_WEIGHTS
  return np.clip(np.trunc(luma * np.float32(255.5)), 0, 255).astype(np.uint8)


def cifar_example(image: np.ndarray, label: int) -> dict[str, np.ndarray]:
  """One LRA Image example: a CIFAR-10 image as 1024 grayscale pixel tokens.

  Args:
    image: uint8 [32, 32, 3] (or already gray: [32, 32] / [32, 32, 1]).
    label: the class, 0..9.

  Returns:
    ``inputs``, ``targets`` int32 [1026] (``BOS``, the pixels row by row as ``FIRST_FREE_ID +
    value``, ``ANSWER`` | the class token ``IMAGE_LABEL_BASE + label``), ``loss_mask`` uint8
    [1026] (1 at the last position) and ``label`` int32 [].
  """
  label = _check_label(label, IMAGE_NUM_CLASSES, "cifar_example")
  gray = grayscale(image)
  if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f"cifar_example: image must be {IMAGE_SIZE}x{IMAGE_SIZE}; got shape "
                     f"{np.shape(image)}.")
  pixels = gray.reshape(-1).astype(np.int32) + token_layout.FIRST_FREE_ID
  example = classification_example(pixels, IMAGE_LABEL_BASE + label, IMAGE_SEQ_LEN)
  return {**example, "label": np.int32(label)}


def retrieval_example(text1: str | bytes, text2: str | bytes, label: int,
                      seq_len: int = RETRIEVAL_SEQ_LEN) -> dict[str, np.ndarray]:
  """One LRA Retrieval example: two documents, class 1 when one cites the other.

  Args:
    text1, text2: the documents (str or UTF-8 bytes).
    label: 0 or 1.
    seq_len: length of ``inputs`` / ``targets``, >= 5; each document keeps its first
      ``(seq_len - 3) // 2`` bytes.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len] laid out ``PAD.. BOS doc_1 SEP doc_2 ANSWER |
    label``, ``loss_mask`` uint8 [seq_len] (1 at the last position), ``label`` int32 [],
    ``length1``, ``length2`` int32 [] (bytes of each whole document, before the cut).
  """
  if seq_len < 5:
    raise ValueError(f"retrieval_example: seq_len must be >= 5; got {seq_len}.")
  label = _check_label(label, 2, "retrieval_example")
  budget = (seq_len - 3) // 2
  data1, data2 = _as_bytes(text1, "retrieval_example"), _as_bytes(text2, "retrieval_example")
  content = np.concatenate([byte_tokens(data1, budget), [token_layout.SEP],
                            byte_tokens(data2, budget)])
  example = classification_example(content, BYTE_LABEL_BASE + label, seq_len)
  return {**example, "label": np.int32(label), "length1": np.int32(len(data1)),
          "length2": np.int32(len(data2))}


class MappedSource:
  """Random access to ``convert(records[i])``: a Grain ``RandomAccessDataSource``.

  Args:
    records: anything with ``len`` and ``records[i]`` (a TFDS data source, a TSV reader).
    convert: a picklable function from one record to an example dict.
  """

  def __init__(self, records: Any, convert: Callable[[Any], dict[str, np.ndarray]]):
    self.records = records
    self.convert = convert

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for a source of {len(self)} examples.")
    return self.convert(self.records[index % len(self)])

  def __repr__(self) -> str:
    return f"{type(self).__name__}({len(self)} examples, {self.records!r})"


def _tfds_data_dir(data_dir: str | os.PathLike | None) -> str:
  if data_dir is None:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  return os.fspath(data_dir)


def _tfds_records(name: str, data_dir: str | os.PathLike | None, split: str, task: str) -> Any:
  """The TFDS ``name`` prepared in ``data_dir``, split ``split``, as an array_record data source.

  Raises FileNotFoundError (with the command that prepares it) when it is not prepared there, or
  only in a format without random access; ValueError for an unknown split.
  """
  data_dir = _tfds_data_dir(data_dir)
  prepare = (f"prepare it once on a machine with network access: `tfds build {name} "
             f"--data_dir={data_dir} --file_format=array_record` (then copy the folder "
             f"{os.path.join(data_dir, name)} here if that machine is another one)")
  if not os.path.isdir(os.path.join(data_dir, name)):
    raise FileNotFoundError(f"{task}: the TFDS dataset {name!r} is not in data_dir={data_dir!r} "
                            f"(no folder {os.path.join(data_dir, name)!r}); {prepare}.")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"{task}: the TFDS dataset {name!r} is not prepared in "
                            f"{builder.data_dir!r} (no dataset_info.json for this version); "
                            f"{prepare}.")
  formats = builder.info.available_file_formats()
  if not formats & set(tfds.core.FileFormat.with_random_access()):
    raise FileNotFoundError(
        f"{task}: the TFDS dataset {name!r} in {builder.data_dir!r} is prepared as "
        f"{sorted(f.value for f in formats)} only, which has no random access; lclm reads "
        f"array_record files: {prepare} (into another data_dir, or delete the old copy first).")
  splits = sorted(builder.info.splits)
  if split not in splits:
    raise ValueError(f"{task}: split must be one of {splits}; got {split!r}.")
  return builder.as_data_source(split=split)


def _convert_imdb(record: dict[str, Any], seq_len: int) -> dict[str, np.ndarray]:
  return imdb_example(record["text"], record["label"], seq_len)


def _convert_cifar(record: dict[str, Any]) -> dict[str, np.ndarray]:
  return cifar_example(record["image"], record["label"])


def lra_text_source(data_dir: str | os.PathLike | None, split: str = "train",
                    seq_len: int = TEXT_SEQ_LEN) -> MappedSource:
  """LRA Text: the TFDS ``imdb_reviews`` reviews prepared (array_record) under ``data_dir``.

  Args:
    data_dir: the TFDS data folder (None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    split: ``"train"`` or ``"test"`` (LRA evaluates on test), or any split of the builder.
    seq_len: length of ``inputs`` / ``targets`` (LRA: 4K bytes).

  Returns:
    A source of :func:`imdb_example` dicts.
  """
  if seq_len < 3:
    raise ValueError(f"lra_text_source: seq_len must be >= 3; got {seq_len}.")
  records = _tfds_records("imdb_reviews", data_dir, split, "lra_text_source")
  return MappedSource(records, functools.partial(_convert_imdb, seq_len=int(seq_len)))


def lra_image_source(data_dir: str | os.PathLike | None, split: str = "train") -> MappedSource:
  """LRA Image: the TFDS ``cifar10`` images prepared (array_record) under ``data_dir``.

  Args:
    data_dir: the TFDS data folder (None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    split: ``"train"`` or ``"test"``.

  Returns:
    A source of :func:`cifar_example` dicts (``seq_len`` 1026).
  """
  records = _tfds_records("cifar10", data_dir, split, "lra_image_source")
  return MappedSource(records, _convert_cifar)


class AanPairsFile:
  """Random access to the rows of one LRA AAN file, ``new_aan_pairs.<split>.tsv``.

  Each line holds five tab-separated fields: label (``0``/``1``, possibly written ``1.0``), the
  two paper ids and the two texts. A first line whose label is not a number (a header) is
  skipped, and so are empty lines. Only the line offsets are kept in memory; ``file[i]`` reads
  line ``i`` from disk and returns ``(label, text1, text2)`` with the texts as bytes.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.offsets = self._line_offsets(self.path)
    self._file = None
    if len(self.offsets) > 1:
      first = self._read_line(0)
      try:
        self._parse(first, 0)
      except ValueError:
        if self._is_number(first.split(b"\t")[0]):
          raise
        self.offsets = self.offsets[1:]  # A header.

  @staticmethod
  def _is_number(field: bytes) -> bool:
    try:
      float(field)
    except ValueError:
      return False
    return True

  @staticmethod
  def _line_offsets(path: str) -> np.ndarray:
    """int64 [num_lines + 1]: where each nonempty line starts, then where the last one ends."""
    starts, ends, position = [], [], 0
    with open(path, "rb") as f:
      while chunk := f.read(1 << 24):
        newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + position
        ends.append(newlines)
        starts.append(newlines + 1)
        position += len(chunk)
    ends = np.concatenate(ends + [np.array([position], np.int64)]).astype(np.int64)
    starts = np.concatenate([np.array([0], np.int64)] + starts).astype(np.int64)
    keep = ends > starts  # Drops empty lines (and the empty tail after a final newline).
    starts, ends = starts[keep], ends[keep]
    # Line i spans [starts[i], ends[i]); the reader finds its end at the next newline.
    return np.append(starts, ends[-1] if len(ends) else 0)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def _read_line(self, index: int) -> bytes:
    if self._file is None:
      self._file = open(self.path, "rb")  # pylint: disable=consider-using-with
    self._file.seek(int(self.offsets[index]))
    return self._file.readline().rstrip(b"\r\n")

  def _parse(self, line: bytes, index: int) -> tuple[int, bytes, bytes]:
    fields = line.split(b"\t")
    if len(fields) != 5:
      raise ValueError(f"{self.path} row {index}: expected 5 tab-separated fields (label, id1, "
                       f"id2, text1, text2); got {len(fields)}.")
    try:
      label = float(fields[0])
    except ValueError:
      raise ValueError(f"{self.path} row {index}: the label {fields[0][:20]!r} is not a "
                       "number.") from None
    if label not in (0.0, 1.0):
      raise ValueError(f"{self.path} row {index}: the label must be 0 or 1; got {label}.")
    return int(label), fields[3], fields[4]

  def __getitem__(self, index: int) -> tuple[int, bytes, bytes]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range for {self.path} ({len(self)} rows).")
    return self._parse(self._read_line(index), index)

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_file"] = None  # Each process opens its own handle.
    return state

  def __repr__(self) -> str:
    return f"AanPairsFile({self.path!r}, {len(self)} rows)"


def _convert_aan(row: tuple[int, bytes, bytes], seq_len: int) -> dict[str, np.ndarray]:
  label, text1, text2 = row
  return retrieval_example(text1, text2, label, seq_len)


def lra_retrieval_source(path: str | os.PathLike, split: str = "train",
                         seq_len: int = RETRIEVAL_SEQ_LEN) -> MappedSource:
  """LRA Retrieval: the AAN citation pairs of ``<path>/new_aan_pairs.<split>.tsv``.

  Args:
    path: the folder holding LRA's ``new_aan_pairs.{train,eval,test}.tsv`` (in the
      ``lra_release`` archive under ``lra_release/tsv_data/``).
    split: ``"train"``, ``"eval"`` (alias ``"validation"``) or ``"test"``.
    seq_len: length of ``inputs`` / ``targets``; each document keeps ``(seq_len - 3) // 2``
      bytes.

  Returns:
    A source of :func:`retrieval_example` dicts.
  """
  if split not in RETRIEVAL_SPLITS:
    raise ValueError(f"lra_retrieval_source: split must be one of {sorted(RETRIEVAL_SPLITS)}; "
                     f"got {split!r}.")
  if seq_len < 5:
    raise ValueError(f"lra_retrieval_source: seq_len must be >= 5; got {seq_len}.")
  folder = os.fspath(path)
  file = os.path.join(folder, RETRIEVAL_FILE.format(RETRIEVAL_SPLITS[split]))
  if not os.path.isfile(file):
    where = (f"the folder {folder!r} has no {os.path.basename(file)}" if os.path.isdir(folder)
             else f"there is no folder {folder!r}")
    raise FileNotFoundError(
        f"lra_retrieval_source: {where}. Download lra_release.gz once from the Long Range Arena "
        "repository (github.com/google-research/long-range-arena, the 'Dataset setup' section), "
        "unpack it and pass the folder holding new_aan_pairs.train.tsv, new_aan_pairs.eval.tsv "
        "and new_aan_pairs.test.tsv (lra_release/tsv_data).")
  return MappedSource(AanPairsFile(file), functools.partial(_convert_aan, seq_len=int(seq_len)))


__all__ = [
    "AanPairsFile", "BYTE_LABEL_BASE", "BYTE_VOCAB_SIZE", "IMAGE_FEATURES", "IMAGE_LABEL_BASE",
    "IMAGE_SEQ_LEN", "IMAGE_VOCAB_SIZE", "MappedSource", "RETRIEVAL_FEATURES", "TEXT_FEATURES",
    "byte_tokens", "cifar_example", "classification_example", "content_tokens", "decode_bytes",
    "grayscale", "imdb_example", "lra_image_source", "lra_retrieval_source", "lra_text_source",
    "retrieval_example",
]
