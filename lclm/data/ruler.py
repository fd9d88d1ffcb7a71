"""Token-level versions of RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the real
context size of your long-context language models?"), as pure numpy generators.

The sequences are token ids, not text: a tiny model can be trained on them from scratch, and any
model whose vocabulary holds ``vocab_size`` ids can be evaluated on them. Markers (``BOS``,
``KEY``, ``VALUE``, ``SEP``, ``QUERY``, ``ANSWER``, ``VAR``, ``ASSIGN``, ``PAD``) are the reserved
ids of :mod:`lclm.data.token_layout`; content (keys, values, variable names, words, filler) comes
from ``[FIRST_FREE_ID, vocab_size)``, split into disjoint ranges, so content is never mistaken for
structure nor one kind of content for another.

Every task is a frozen config (``seq_len``, ``vocab_size`` and the task's options, validated on
construction; ``config.min_seq_len()`` is the shortest ``seq_len`` the structure fits in) and a
generator ``make_<task>_example(rng, config)`` that builds a sequence ``s`` of ``seq_len + 1``
tokens and returns

* ``inputs = s[:-1]``, ``targets = s[1:]``: int32 [seq_len];
* ``loss_mask``: uint8 [seq_len], 1 exactly where the target is an answer token, so the answer is
  one maximal run of ones (the span that ``lclm.training.generation_eval`` generates);
* the scalar features of ``<TASK>_FEATURES`` (name -> numpy dtype), as numpy scalars.

Layouts of ``s`` (``|`` only separates parts; it is not a token):

* ``niah`` (needle in a haystack)::

    BOS  haystack  | query | answer
    needle   = KEY k_1 .. k_key_len VALUE v_1 .. v_value_len SEP
    single / multikey / multivalue:  query = QUERY k_1 .. k_key_len ANSWER
    multiquery:  query = QUERY key(1) QUERY key(2) .. QUERY key(q) ANSWER
                 answer = value(1) value(2) .. value(q)   (value of each queried key, query order)

  The haystack is filler with the needles inserted whole between filler tokens. ``single``: one
  needle. ``multikey``: the queried needle and distractor needles with other keys. ``multivalue``:
  ``num_values`` needles share the queried key, each with its own value; the answer is their
  values in the order the needles appear (then distractors with other keys, if
  ``num_needles > num_values``). ``multiquery``: ``num_queries`` needles are asked for, in a random
  query order (plus distractors). The key tokens of one example are all distinct (so keys are
  distinct, distractors included), and so are its value tokens.
* ``variable_tracking``::

    BOS  haystack  | QUERY value ANSWER | x_1 x_2 .. x_{num_hops+1}
    assignments: VAR x_1 ASSIGN value SEP,  VAR x_2 ASSIGN x_1 SEP, ..,  VAR x_{h+1} ASSIGN x_h SEP

  Each chain's ``num_hops + 1`` assignments lie in order among the filler; ``num_chains - 1``
  distractor chains have other values and other variables; chains interleave. Variable names and
  values are single tokens from disjoint ranges; all names of an example are distinct, and so are
  the chains' values. The answer lists the queried chain's variables in assignment order.
* ``common_words``::

    BOS  w_1 .. w_L  | QUERY ANSWER | c_1 .. c_num_common | PAD ..

  ``num_common`` words appear ``common_frequency`` times each, ``num_uncommon`` others
  ``uncommon_frequency`` times each, shuffled; the answer is the common words in ascending id
  order. With ``num_uncommon=None`` the list grows with ``seq_len`` (as in RULER): as many uncommon
  words as fit. Positions the list does not fill (fewer than ``uncommon_frequency`` when derived)
  are ``PAD`` after the answer (targets there are unmasked).
* ``frequent_words``::

    BOS  w_1 .. w_L  | QUERY ANSWER | a_1 .. a_num_answers

  ``L = seq_len - 2 - num_answers`` words drawn from a Zipf law over ``num_words`` word ids
  (p(rank r) ∝ r ** -alpha; ranks are mapped onto word ids at random per example); the answer is
  the ``num_answers`` most frequent words, most frequent first. The counts of the top
  ``num_answers + 1`` words are made strictly decreasing (ties are broken by moving occurrences
  from the rarest words to the top ones), so the answer and its order are unique.

Haystack filler (``niah``, ``variable_tracking``): ``"noise"`` draws every filler token uniformly
from the filler range; ``"repeat"`` repeats one fixed pattern of ``REPEAT_PATTERN_LEN`` filler ids
(fixed for a given ``vocab_size``, the same in every example, like RULER's "The grass is green...")
continuously across the inserted needles. A needle's depth is the number of filler tokens before
it divided by the number of filler tokens (``0`` when there is no filler); a requested ``depth``
places it after ``round(depth * filler_len)`` filler tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from lclm.data import token_layout as tl

NIAH_VARIANTS = ("single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("noise", "repeat")
REPEAT_PATTERN_LEN = 8  # tokens of the fixed filler pattern of the "repeat" haystack
_REPEAT_PATTERN_SEED = 20240406  # fixes that pattern (per vocab_size), the same for every example

NIAH_FEATURES = {"depth": np.float32, "needle_position": np.int32, "num_needles": np.int32}
VARIABLE_TRACKING_FEATURES = {"depth": np.float32, "num_hops": np.int32}
COMMON_WORDS_FEATURES = {"num_words": np.int32}
FREQUENT_WORDS_FEATURES = {"top_count": np.int32}


# ---------------------------------------------------------------------------------------------
# Shared pieces.


def _check_count(owner: str, name: str, value, minimum: int = 1):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{owner}: {name} must be an integer >= {minimum}; got {value!r}.")


def _check_depth(owner: str, depth):
  if depth is not None and not (isinstance(depth, (int, float, np.floating))
                                and math.isfinite(depth) and 0.0 <= depth <= 1.0):
    raise ValueError(f"{owner}: depth must be None (uniform) or a number in [0, 1]; got {depth!r}.")


def _check_choice(owner: str, name: str, value, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"{owner}: {name} must be one of {list(choices)}; got {value!r}.")


def _check_seq_len(owner: str, seq_len, minimum: int, what: str):
  _check_count(owner, "seq_len", seq_len)
  if seq_len < minimum:
    raise ValueError(f"{owner}: seq_len={seq_len} is too short for {what}; use seq_len >= "
                     f"{minimum}.")


def _repeat_pattern(filler_range: tuple[int, int]) -> np.ndarray:
  """int64 [REPEAT_PATTERN_LEN]: the fixed filler pattern of the ``"repeat"`` haystack."""
  return np.random.default_rng(_REPEAT_PATTERN_SEED).integers(*filler_range, REPEAT_PATTERN_LEN)


def _filler(rng: np.random.Generator, haystack: str, filler_range: tuple[int, int],
            length: int) -> np.ndarray:
  """int64 [length]: filler tokens, uniform noise or the repeated pattern."""
  if haystack == "noise":
    return rng.integers(*filler_range, size=length)
  return np.resize(_repeat_pattern(filler_range), length)


def _insert_records(filler: np.ndarray, records: np.ndarray, cuts: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Inserts whole records into the filler.

  Args:
    filler: int64 [F] filler tokens.
    records: int64 [R, record_len], in the order they appear.
    cuts: int [R], nondecreasing: record ``i`` follows ``cuts[i]`` filler tokens.

  Returns:
    the haystack, int64 [F + R * record_len], and the start of each record in it, int64 [R].
  """
  num, record_len = records.shape
  starts = np.asarray(cuts, np.int64) + np.arange(num) * record_len
  hay = np.empty(len(filler) + num * record_len, np.int64)
  at = (starts[:, None] + np.arange(record_len)).reshape(-1)
  is_record = np.zeros(len(hay), bool)
  is_record[at] = True
  hay[at] = records.reshape(-1)
  hay[~is_record] = filler
  return hay, starts


def _finish(seq_parts: list, seq_len: int, answer_start: int, answer_end: int,
            features: dict) -> dict[str, np.ndarray]:
  seq = np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in seq_parts])
  assert seq.shape == (seq_len + 1,), (seq.shape, seq_len)
  out = tl.shifted(seq, answer_start, answer_end)
  out.update(features)
  return out


# ---------------------------------------------------------------------------------------------
# Needle in a haystack.


@dataclasses.dataclass(frozen=True)
class NiahConfig:
  """Shape of a needle-in-a-haystack task (see the module docstring for the layout).

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len()``.
    vocab_size: token ids lie in ``[0, vocab_size)``.
    variant: ``"single"``, ``"multikey"``, ``"multivalue"`` or ``"multiquery"``.
    num_needles: needles in the haystack, distractors included; None: 1 (single), 4 (multikey),
      ``num_values`` (multivalue), ``num_queries`` (multiquery). ``single`` takes exactly 1.
    num_values: multivalue only (else 1): values of the queried key, one needle each; None: 4.
    num_queries: multiquery only (else 1): keys asked for, one needle each; None: 4.
    key_len, value_len: tokens per key / per value.
    haystack: ``"noise"`` (uniform filler) or ``"repeat"`` (a fixed pattern repeated).
    depth: filler fraction before the first queried needle, in [0, 1]; None draws it uniformly.
  """
  seq_len: int
  vocab_size: int
  variant: str = "single"
  num_needles: int | None = None
  num_values: int | None = None
  num_queries: int | None = None
  key_len: int = 1
  value_len: int = 1
  haystack: str = "noise"
  depth: float | None = None

  def __post_init__(self):
    owner = type(self).__name__
    _check_count(owner, "vocab_size", self.vocab_size)
    _check_choice(owner, "variant", self.variant, NIAH_VARIANTS)
    _check_choice(owner, "haystack", self.haystack, HAYSTACKS)
    _check_count(owner, "key_len", self.key_len)
    _check_count(owner, "value_len", self.value_len)
    for name, variant in (("num_values", "multivalue"), ("num_queries", "multiquery")):
      value = getattr(self, name)
      if value is None:
        continue
      _check_count(owner, name, value)
      if self.variant != variant and value != 1:
        raise ValueError(f"{owner}: {name}={value} needs variant={variant!r} (got variant="
                         f"{self.variant!r}); leave it None or 1.")
    if self.num_needles is not None:
      _check_count(owner, "num_needles", self.num_needles)
    needed = {"single": 1, "multikey": 2}.get(self.variant, self.queried_needles)
    if self.variant == "single" and self.needles != 1:
      raise ValueError(f"{owner}: variant='single' has exactly one needle; got num_needles="
                       f"{self.num_needles} (use variant='multikey' for distractor needles).")
    if self.needles < needed:
      raise ValueError(f"{owner}: variant={self.variant!r} needs num_needles >= {needed} "
                       f"(queried needles plus distractors); got {self.num_needles}.")
    _check_depth(owner, self.depth)
    self.ranges()
    _check_seq_len(owner, self.seq_len, self.min_seq_len(),
                   f"{self.needles} needles of {self.needle_len} tokens and the query")

  @property
  def values(self) -> int:
    """Values of the queried key (multivalue), else 1."""
    if self.num_values is None:
      return 4 if self.variant == "multivalue" else 1
    return self.num_values

  @property
  def queries(self) -> int:
    """Keys asked for (multiquery), else 1."""
    if self.num_queries is None:
      return 4 if self.variant == "multiquery" else 1
    return self.num_queries

  @property
  def queried_needles(self) -> int:
    """Needles whose values form the answer."""
    return {"multivalue": self.values, "multiquery": self.queries}.get(self.variant, 1)

  @property
  def needles(self) -> int:
    """Needles in the haystack, distractors included."""
    if self.num_needles is not None:
      return self.num_needles
    return {"multikey": 4}.get(self.variant, self.queried_needles)

  @property
  def num_keys(self) -> int:
    """Distinct keys in an example (the multivalue needles share one)."""
    if self.variant == "multivalue":
      return 1 + self.needles - self.values
    return self.needles

  @property
  def needle_len(self) -> int:
    return self.key_len + self.value_len + 3

  @property
  def query_len(self) -> int:
    """Tokens from the first QUERY to ANSWER, both included."""
    return self.queries * (1 + self.key_len) + 1

  @property
  def answer_len(self) -> int:
    return self.queried_needles * self.value_len

  def ranges(self) -> dict[str, tuple[int, int]]:
    """The disjoint id ranges ``"key"``, ``"value"``, ``"filler"``: name -> (low, high)."""
    return tl.split_range(
        self.vocab_size, {"key": 1, "value": 1, "filler": 1},
        minimum={"key": self.num_keys * self.key_len, "value": self.needles * self.value_len,
                 "filler": 1}, owner=type(self).__name__)

  def min_seq_len(self) -> int:
    """The shortest ``seq_len``: the needles, query and answer with no filler."""
    return self.needles * self.needle_len + self.query_len + self.answer_len

  def filler_len(self) -> int:
    """Filler tokens in the haystack of this ``seq_len``."""
    return self.seq_len - self.min_seq_len()


def make_niah_example(rng: np.random.Generator, config: NiahConfig) -> dict[str, np.ndarray]:
  """One needle-in-a-haystack example.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on the answer
    tokens); ``depth`` float32 [] (realised depth of the first queried needle, its filler offset /
    filler length); ``needle_position`` int32 [] (index in ``inputs`` of that needle's KEY);
    ``num_needles`` int32 [].
  """
  c = config
  ranges = c.ranges()
  n, nq, kl, vl = c.needles, c.queried_needles, c.key_len, c.value_len
  keys = tl.distinct(rng, ranges["key"], c.num_keys * kl).reshape(c.num_keys, kl)
  values = tl.distinct(rng, ranges["value"], n * vl).reshape(n, vl)
  # Needles 0..nq-1 are queried (needle 0 is placed at the depth, the others after it).
  if c.variant == "multivalue":
    key_of = np.concatenate([np.zeros(nq, np.int64), 1 + np.arange(n - nq)])
  else:
    key_of = np.arange(n)
  records = np.concatenate([
      np.full((n, 1), tl.KEY), keys[key_of], np.full((n, 1), tl.VALUE), values,
      np.full((n, 1), tl.SEP)], axis=1)

  filler_len = c.filler_len()
  depth = rng.uniform() if c.depth is None else float(c.depth)
  first_cut = int(round(depth * filler_len))
  cuts = np.concatenate([[first_cut], rng.integers(first_cut, filler_len + 1, nq - 1),
                         rng.integers(0, filler_len + 1, n - nq)])
  priority = np.ones(n, np.int64)
  priority[0] = 0  # needle 0 comes first among needles at the same cut
  order = np.lexsort((rng.random(n), priority, cuts))
  filler = _filler(rng, c.haystack, ranges["filler"], filler_len)
  hay, starts = _insert_records(filler, records[order], cuts[order])
  rank = np.argsort(order)  # rank[i]: place of needle i in the haystack

  if c.variant == "multiquery":
    asked = rng.permutation(nq)
    query = np.concatenate([np.full((nq, 1), tl.QUERY), keys[key_of[asked]]], axis=1)
    answer = values[asked]
  else:
    query = np.concatenate([[tl.QUERY], keys[0]])
    answer = values[np.argsort(rank[:nq])]  # multivalue: in the order the needles appear
  seq_len = c.seq_len
  answer_start = seq_len + 1 - c.answer_len
  return _finish(
      [[tl.BOS], hay, query, [tl.ANSWER], answer], seq_len, answer_start, seq_len + 1,
      {"depth": np.float32(first_cut / filler_len if filler_len else 0.0),
       "needle_position": np.int32(1 + starts[rank[0]]),
       "num_needles": np.int32(n)})


# ---------------------------------------------------------------------------------------------
# Variable tracking.


@dataclasses.dataclass(frozen=True)
class VariableTrackingConfig:
  """Shape of a variable-tracking task (see the module docstring for the layout).

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len()``.
    vocab_size: token ids lie in ``[0, vocab_size)``.
    num_chains: assignment chains, the queried one included (the others are distractors).
    num_hops: assignments after the first in each chain; the answer has ``num_hops + 1`` names.
    depth: filler fraction before the queried chain's first assignment, in [0, 1]; None draws it
      uniformly.
    haystack: ``"noise"`` (uniform filler) or ``"repeat"`` (a fixed pattern repeated).
  """
  seq_len: int
  vocab_size: int
  num_chains: int = 1
  num_hops: int = 4
  depth: float | None = None
  haystack: str = "noise"

  RECORD_LEN = 5  # VAR name ASSIGN rhs SEP

  def __post_init__(self):
    owner = type(self).__name__
    _check_count(owner, "vocab_size", self.vocab_size)
    _check_count(owner, "num_chains", self.num_chains)
    _check_count(owner, "num_hops", self.num_hops)
    _check_depth(owner, self.depth)
    _check_choice(owner, "haystack", self.haystack, HAYSTACKS)
    self.ranges()
    _check_seq_len(owner, self.seq_len, self.min_seq_len(),
                   f"{self.num_assignments} assignments of {self.RECORD_LEN} tokens and the query")

  @property
  def num_assignments(self) -> int:
    return self.num_chains * (self.num_hops + 1)

  def ranges(self) -> dict[str, tuple[int, int]]:
    """The disjoint id ranges ``"name"``, ``"value"``, ``"filler"``: name -> (low, high)."""
    return tl.split_range(
        self.vocab_size, {"name": 1, "value": 1, "filler": 1},
        minimum={"name": self.num_assignments, "value": self.num_chains, "filler": 1},
        owner=type(self).__name__)

  def min_seq_len(self) -> int:
    """The shortest ``seq_len``: assignments, query and answer with no filler."""
    return self.RECORD_LEN * self.num_assignments + 3 + self.num_hops + 1

  def filler_len(self) -> int:
    return self.seq_len - self.min_seq_len()


def make_variable_tracking_example(rng: np.random.Generator, config: VariableTrackingConfig
                                   ) -> dict[str, np.ndarray]:
  """One variable-tracking example.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on the answer
    names); ``depth`` float32 [] (realised depth of the queried chain's first assignment);
    ``num_hops`` int32 [].
  """
  c = config
  ranges = c.ranges()
  chains, links = c.num_chains, c.num_hops + 1
  names = tl.distinct(rng, ranges["name"], chains * links).reshape(chains, links)
  values = tl.distinct(rng, ranges["value"], chains)
  rhs = np.concatenate([values[:, None], names[:, :-1]], axis=1)
  records = np.stack([np.full_like(names, tl.VAR), names, np.full_like(names, tl.ASSIGN), rhs,
                      np.full_like(names, tl.SEP)], axis=-1).reshape(chains * links, -1)

  filler_len = c.filler_len()
  depth = rng.uniform() if c.depth is None else float(c.depth)
  first_cut = int(round(depth * filler_len))
  cuts = np.empty((chains, links), np.int64)
  cuts[0, 0] = first_cut
  cuts[0, 1:] = np.sort(rng.integers(first_cut, filler_len + 1, links - 1))
  cuts[1:] = np.sort(rng.integers(0, filler_len + 1, (chains - 1, links)), axis=1)
  cuts = cuts.reshape(-1)
  hop = np.tile(np.arange(links), chains)
  # Sorted by cut, then hop: a chain's assignments stay in order.
  order = np.lexsort((rng.random(len(cuts)), hop, cuts))
  filler = _filler(rng, c.haystack, ranges["filler"], filler_len)
  hay, _ = _insert_records(filler, records[order], cuts[order])

  seq_len = c.seq_len
  return _finish(
      [[tl.BOS], hay, [tl.QUERY, values[0], tl.ANSWER], names[0]], seq_len,
      seq_len + 1 - links, seq_len + 1,
      {"depth": np.float32(first_cut / filler_len if filler_len else 0.0),
       "num_hops": np.int32(c.num_hops)})


# ---------------------------------------------------------------------------------------------
# Common words extraction.


@dataclasses.dataclass(frozen=True)
class CommonWordsConfig:
  """Shape of a common-words task (see the module docstring for the layout).

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len()``.
    vocab_size: token ids lie in ``[0, vocab_size)``; the word range needs ``num_common +
      num_uncommon`` ids.
    num_common: words that appear ``common_frequency`` times each: the answer.
    common_frequency: occurrences of each common word; > ``uncommon_frequency``.
    uncommon_frequency: occurrences of each other word; >= 1.
    num_uncommon: other words; None: as many as ``seq_len`` holds.
  """
  seq_len: int
  vocab_size: int
  num_common: int = 10
  common_frequency: int = 30
  uncommon_frequency: int = 3
  num_uncommon: int | None = None

  def __post_init__(self):
    owner = type(self).__name__
    _check_count(owner, "vocab_size", self.vocab_size)
    _check_count(owner, "num_common", self.num_common)
    _check_count(owner, "uncommon_frequency", self.uncommon_frequency)
    _check_count(owner, "common_frequency", self.common_frequency)
    if self.common_frequency <= self.uncommon_frequency:
      raise ValueError(f"{owner}: common_frequency={self.common_frequency} must exceed "
                       f"uncommon_frequency={self.uncommon_frequency}.")
    if self.num_uncommon is not None:
      _check_count(owner, "num_uncommon", self.num_uncommon, minimum=0)
    _check_seq_len(owner, self.seq_len, self.min_seq_len(),
                   f"{self.num_common} common words x {self.common_frequency}"
                   + (f" and {self.num_uncommon} uncommon words x {self.uncommon_frequency}"
                      if self.num_uncommon else "") + " and the answer")
    try:
      self.ranges()
    except ValueError as e:
      hint = (" (num_uncommon is derived from seq_len; pass a smaller num_uncommon or seq_len)"
              if self.num_uncommon is None else "")
      raise ValueError(f"{e}{hint}") from None

  @property
  def uncommon(self) -> int:
    """Uncommon words in an example."""
    if self.num_uncommon is not None:
      return self.num_uncommon
    return (self.max_list_len - self.num_common * self.common_frequency) // self.uncommon_frequency

  @property
  def max_list_len(self) -> int:
    """Positions between BOS and QUERY."""
    return self.seq_len - 2 - self.num_common

  @property
  def list_len(self) -> int:
    """Words in the list, repeats included."""
    return self.num_common * self.common_frequency + self.uncommon * self.uncommon_frequency

  def ranges(self) -> dict[str, tuple[int, int]]:
    """The word id range: ``{"word": (low, high)}``."""
    return tl.split_range(self.vocab_size, {"word": 1},
                          minimum={"word": self.num_common + self.uncommon},
                          owner=type(self).__name__)

  def min_seq_len(self) -> int:
    """The shortest ``seq_len``: the common words (and any requested uncommon ones), query and
    answer."""
    return (self.num_common * (self.common_frequency + 1) + 2
            + (self.num_uncommon or 0) * self.uncommon_frequency)


def make_common_words_example(rng: np.random.Generator, config: CommonWordsConfig
                              ) -> dict[str, np.ndarray]:
  """One common-words example.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on the answer);
    ``num_words`` int32 [] (distinct words in the list, ``num_common + num_uncommon``).
  """
  c = config
  nc, nu = c.num_common, c.uncommon
  words = tl.distinct(rng, c.ranges()["word"], nc + nu)
  counts = np.concatenate([np.full(nc, c.common_frequency), np.full(nu, c.uncommon_frequency)])
  listing = rng.permutation(np.repeat(words, counts))
  answer = np.sort(words[:nc])
  answer_start = 1 + len(listing) + 2
  pad = np.full(c.max_list_len - len(listing), tl.PAD)
  return _finish([[tl.BOS], listing, [tl.QUERY, tl.ANSWER], answer, pad], c.seq_len,
                 answer_start, answer_start + nc, {"num_words": np.int32(nc + nu)})


# ---------------------------------------------------------------------------------------------
# Frequent words extraction.


@dataclasses.dataclass(frozen=True)
class FrequentWordsConfig:
  """Shape of a frequent-words task (see the module docstring for the layout).

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len()``.
    vocab_size: token ids lie in ``[0, vocab_size)``.
    num_answers: the most frequent words asked for, most frequent first.
    alpha: Zipf exponent, p(rank r) ∝ r ** -alpha; finite and >= 0.
    num_words: word ids the law ranges over (> num_answers); None: the whole free id range.
  """
  seq_len: int
  vocab_size: int
  num_answers: int = 3
  alpha: float = 2.0
  num_words: int | None = None

  def __post_init__(self):
    owner = type(self).__name__
    _check_count(owner, "vocab_size", self.vocab_size)
    _check_count(owner, "num_answers", self.num_answers)
    if not (isinstance(self.alpha, (int, float, np.floating)) and math.isfinite(self.alpha)
            and self.alpha >= 0):
      raise ValueError(f"{owner}: alpha must be finite and >= 0; got {self.alpha!r}.")
    if self.num_words is not None:
      _check_count(owner, "num_words", self.num_words, minimum=self.num_answers + 1)
    self.ranges()
    _check_seq_len(owner, self.seq_len, self.min_seq_len(),
                   f"{self.num_answers} answers with strictly decreasing counts")

  def ranges(self) -> dict[str, tuple[int, int]]:
    """The word id range: ``{"word": (low, high)}``."""
    need = max(self.num_answers + 1, self.num_words or 0)
    return tl.split_range(self.vocab_size, {"word": 1}, minimum={"word": need},
                          owner=type(self).__name__)

  @property
  def words(self) -> int:
    """Word ids the Zipf law ranges over."""
    low, high = self.ranges()["word"]
    return self.num_words or high - low

  @property
  def list_len(self) -> int:
    return self.seq_len - 2 - self.num_answers

  def min_seq_len(self) -> int:
    """The shortest ``seq_len``: counts num_answers, .., 1 for the top words, query, answer."""
    k = self.num_answers
    return k * (k + 1) // 2 + 2 + k


@functools.lru_cache(maxsize=16)
def _zipf(num_words: int, alpha: float) -> np.ndarray:
  """float64 [num_words]: p(rank r) ∝ r ** -alpha, r = 1..num_words."""
  weights = np.arange(1, num_words + 1, dtype=np.float64) ** -alpha
  return weights / weights.sum()


def strict_top_counts(counts: np.ndarray, k: int) -> np.ndarray:
  """Makes the top ``k + 1`` of descending ``counts`` strictly decreasing, keeping the total.

  Args:
    counts: int [W], nonincreasing, W > k, total >= k (k + 1) / 2.
    k: answers.

  Returns:
    int64 [W] with ``c[0] > c[1] > .. > c[k] >= max(c[k+1:])`` and the same sum: each top count
    is raised to one more than the next, and the occurrences added are taken from the rarest
    words (ranks above k); when those run out, from the top counts with the most room above the
    floor ``k, k-1, .., 0`` (which keeps them strictly decreasing).
  """
  c = np.array(counts, np.int64)
  total = int(c.sum())
  for i in range(k - 1, -1, -1):
    c[i] = max(c[i], c[i + 1] + 1)
  excess = int(c.sum()) - total
  if excess:
    tail = c[k + 1:][::-1]  # rarest first
    taken_before = np.cumsum(tail) - tail
    take = np.clip(excess - taken_before, 0, tail)
    c[k + 1:] = (tail - take)[::-1]
    excess -= int(take.sum())
  if excess:
    # The tail is used up (all zero): lower the top counts' slack above their floor k - i,
    # always where it is largest (the last of the largest, so the slack stays nonincreasing).
    slack = c[:k + 1] - (k - np.arange(k + 1))
    for _ in range(excess):  # excess <= k (k + 1) / 2: each bump added at most k - i
      slack[int(np.nonzero(slack == slack.max())[0][-1])] -= 1
    c[:k + 1] = k - np.arange(k + 1) + slack
  return c


def make_frequent_words_example(rng: np.random.Generator, config: FrequentWordsConfig
                                ) -> dict[str, np.ndarray]:
  """One frequent-words example.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on the answer);
    ``top_count`` int32 [] (occurrences of the most frequent word).
  """
  c = config
  k, num_words = c.num_answers, c.words
  low, _ = c.ranges()["word"]
  counts = np.sort(rng.multinomial(c.list_len, _zipf(num_words, float(c.alpha))))[::-1]
  counts = strict_top_counts(counts, k)
  used = int(np.count_nonzero(counts))
  ids = tl.distinct(rng, (low, low + num_words), used)  # the word of each used rank
  listing = rng.permutation(np.repeat(ids, counts[:used]))
  answer_start = 1 + len(listing) + 2
  return _finish([[tl.BOS], listing, [tl.QUERY, tl.ANSWER], ids[:k]], c.seq_len, answer_start,
                 answer_start + k, {"top_count": np.int32(counts[0])})


TASKS = {
    "niah": (NiahConfig, make_niah_example, NIAH_FEATURES),
    "variable_tracking": (VariableTrackingConfig, make_variable_tracking_example,
                          VARIABLE_TRACKING_FEATURES),
    "common_words": (CommonWordsConfig, make_common_words_example, COMMON_WORDS_FEATURES),
    "frequent_words": (FrequentWordsConfig, make_frequent_words_example,
                       FREQUENT_WORDS_FEATURES),
}

__all__ = [
    "COMMON_WORDS_FEATURES", "CommonWordsConfig", "FREQUENT_WORDS_FEATURES",
    "FrequentWordsConfig", "HAYSTACKS", "NIAH_FEATURES", "NIAH_VARIANTS", "NiahConfig",
    "REPEAT_PATTERN_LEN", "TASKS", "VARIABLE_TRACKING_FEATURES", "VariableTrackingConfig",
    "make_common_words_example", "make_frequent_words_example", "make_niah_example",
    "make_variable_tracking_example", "strict_top_counts",
]
