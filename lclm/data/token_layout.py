"""Token ids shared by the token-level synthetic tasks (RULER-style needles, key-value retrieval,
selective copying, induction heads).

Ids ``[0, FIRST_FREE_ID)`` are reserved: the pad token and structural markers that the tasks use
to delimit needles, queries and answers. Every task draws its content (filler, keys, values,
words) from ``[FIRST_FREE_ID, vocab_size)``, split into disjoint ranges with :func:`split_range`,
so content can never be mistaken for structure, and different kinds of content never for each
other.

The markers are plain ids: a model trained from scratch learns them; a pretrained model given
these ids sees arbitrary (but consistent) tokens, which in-context copying handles.
"""

from __future__ import annotations

import numpy as np

PAD = 0
BOS = 1
EOS = 2
SEP = 3       # ends a needle / an assignment / a record
KEY = 4       # a key follows
VALUE = 5     # a value follows
QUERY = 6     # a question follows
ANSWER = 7    # the answer follows
VAR = 8       # a variable assignment follows (variable tracking)
ASSIGN = 9    # "=" in an assignment
COPY = 10     # start copying (selective copying)
TRIGGER = 11  # the induction-head trigger token
FIRST_FREE_ID = 16  # ids 12..15 are kept free for later markers.

MARKER_NAMES = {PAD: "PAD", BOS: "BOS", EOS: "EOS", SEP: "SEP", KEY: "KEY", VALUE: "VALUE",
                QUERY: "QUERY", ANSWER: "ANSWER", VAR: "VAR", ASSIGN: "ASSIGN", COPY: "COPY",
                TRIGGER: "TRIGGER"}


def split_range(vocab_size: int, shares: dict[str, float], *,
                minimum: dict[str, int] | None = None, owner: str = "task"
                ) -> dict[str, tuple[int, int]]:
  """Splits ``[FIRST_FREE_ID, vocab_size)`` into consecutive disjoint ranges.

  Args:
    vocab_size: the model's vocabulary.
    shares: name -> relative share of the free ids (positive), in the order the ranges are laid.
    minimum: name -> the fewest ids that range needs; a ValueError names the smallest
      ``vocab_size`` that satisfies every minimum.
    owner: named in errors (e.g. ``"NiahConfig"``).

  Returns:
    name -> ``(low, high)``: ids ``low <= id < high``.
  """
  minimum = minimum or {}
  if any(s <= 0 for s in shares.values()):
    raise ValueError(f"{owner}: range shares must be positive, got {shares}.")
  free = vocab_size - FIRST_FREE_ID
  total = sum(shares.values())
  sizes = {name: int(free * share / total) for name, share in shares.items()}
  short = {n: m for n, m in minimum.items() if sizes.get(n, 0) < m}
  if short or free < len(shares):
    need = FIRST_FREE_ID + max(
        [len(shares)] + [int(np.ceil(m * total / shares[n])) + 1 for n, m in minimum.items()])
    raise ValueError(f"{owner}: vocab_size={vocab_size} leaves too few ids for "
                     f"{sorted(short) or list(shares)} (need at least {minimum}); use vocab_size "
                     f">= {need}.")
  ranges, low = {}, FIRST_FREE_ID
  for name, size in sizes.items():
    ranges[name] = (low, low + size)
    low += size
  return ranges


def distinct(rng: np.random.Generator, id_range: tuple[int, int], count: int) -> np.ndarray:
  """int64 [count]: distinct uniform draws from ``[low, high)``, in random order."""
  low, high = id_range
  if count > high - low:
    raise ValueError(f"cannot draw {count} distinct ids from [{low}, {high}).")
  return rng.choice(high - low, size=count, replace=False) + low


def shifted(sequence: np.ndarray, answer_start: int, answer_end: int) -> dict[str, np.ndarray]:
  """The training form of a sequence ``s`` of ``seq_len + 1`` tokens whose answer tokens are
  ``s[answer_start:answer_end]``.

  Returns ``inputs = s[:-1]``, ``targets = s[1:]`` (int32 [seq_len]) and ``loss_mask`` (uint8
  [seq_len], 1 exactly where the target is an answer token).
  """
  seq = np.asarray(sequence, np.int32)
  if not 1 <= answer_start <= answer_end <= len(seq):
    raise ValueError(f"answer [{answer_start}, {answer_end}) must lie in [1, {len(seq)}].")
  loss_mask = np.zeros(len(seq) - 1, np.uint8)
  loss_mask[answer_start - 1:answer_end - 1] = 1
  return {"inputs": seq[:-1].copy(), "targets": seq[1:].copy(), "loss_mask": loss_mask}
