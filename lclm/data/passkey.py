"""Passkey retrieval: a random number hidden at a random depth in filler text, asked for at the end.

The text, tokenized with the byte tokenizer after a bos token, is exactly ``seq_len + 1`` tokens:

  <bos> INTRO filler... NEEDLE filler... QUESTION ANSWER

where NEEDLE states the key twice and ANSWER is the key's digits. ``inputs`` / ``targets`` are the
sequence without its last / first token; ``loss_mask`` is 1 exactly where the target is an answer
digit. The needle sits at a filler-sentence boundary as close as possible to ``depth`` × (filler
length); ``key_position`` is the index in ``inputs`` of the needle's first key digit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lclm.data import tokenizer as tokenizer_lib

INTRO = ("A pass key is hidden somewhere in the text below. Read it all, find the key and "
         "keep it in mind, for you will be asked for it.\n")
FILLER = "The hills are quiet and the river runs on to the sea. Clouds pass over the fields. "
NEEDLE_PREFIX = "The pass key is "
NEEDLE_SUFFIX_TEMPLATE = ". Remember it: {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "

_TOKENIZER = tokenizer_lib.ByteTokenizer()

# Scalar features of every example (name -> dtype).
PASSKEY_FEATURES = {"key_position": np.int32, "depth": np.float32}


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """Shape of a passkey task.

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len(num_digits)``.
    num_digits: digits of the key (the first is never 0).
    depth: where the needle sits, a fraction of the filler in [0, 1]; None draws it uniformly.
  """
  seq_len: int = 1024
  num_digits: int = 5
  depth: float | None = None

  def __post_init__(self):
    if self.num_digits < 1:
      raise ValueError(f"num_digits must be >= 1; got {self.num_digits}.")
    if self.depth is not None and not 0.0 <= self.depth <= 1.0:
      raise ValueError(f"depth must be in [0, 1] or None; got {self.depth}.")
    if self.seq_len < min_seq_len(self.num_digits):
      raise ValueError(f"seq_len={self.seq_len} cannot hold the passkey prompt; use seq_len >= "
                       f"{min_seq_len(self.num_digits)} for num_digits={self.num_digits}.")

  @property
  def vocab_size(self) -> int:
    return _TOKENIZER.vocab_size


def _fixed_length(num_digits: int) -> int:
  """Tokens of everything but the filler, bos included."""
  suffix = NEEDLE_SUFFIX_TEMPLATE.format(key="0" * num_digits)
  return 1 + len(INTRO) + len(NEEDLE_PREFIX) + num_digits + len(suffix) + len(QUESTION) + num_digits


def min_seq_len(num_digits: int) -> int:
  """The shortest ``seq_len`` (no filler at all) for keys of ``num_digits`` digits."""
  return _fixed_length(num_digits) - 1


def make_passkey_example(rng: np.random.Generator, config: PasskeyConfig) -> dict[str, np.ndarray]:
  """One passkey example.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on answer digits);
    ``key_position`` int32 [] (index in ``inputs`` of the needle's key); ``depth`` float32 []
    (needle offset / filler length, the realised depth).
  """
  n = config.num_digits
  key = str(int(rng.integers(10 ** (n - 1), 10 ** n)))
  filler_len = config.seq_len + 1 - _fixed_length(n)
  filler = (FILLER * (filler_len // len(FILLER) + 1))[:filler_len]
  depth = rng.uniform() if config.depth is None else config.depth
  boundaries = np.append(np.arange(0, filler_len + 1, len(FILLER)), filler_len)
  cut = int(boundaries[np.argmin(np.abs(boundaries - depth * filler_len))])

  head = INTRO + filler[:cut] + NEEDLE_PREFIX
  text = (head + key + NEEDLE_SUFFIX_TEMPLATE.format(key=key) + filler[cut:] + QUESTION + key)
  seq = _TOKENIZER.encode(text, add_bos=True)
  assert seq.shape == (config.seq_len + 1,), (seq.shape, config.seq_len)

  loss_mask = np.zeros(config.seq_len, dtype=np.uint8)
  loss_mask[config.seq_len - n:] = 1
  return {
      "inputs": seq[:-1].copy(),
      "targets": seq[1:].copy(),
      "loss_mask": loss_mask,
      "key_position": np.int32(1 + len(head)),
      "depth": np.float32(cut / filler_len if filler_len else 0.0),
  }
