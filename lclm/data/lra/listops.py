"""ListOps (Long Range Arena): nested MAX / MIN / MED / SM expressions over digits, 10 classes.

An expression is written in prefix form without parentheses, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]``
(value 9). The tree is drawn as in LRA's generator: a node at depth ``d < max_depth`` (the root
has depth 1) is an operator with probability ``operator_probability`` (LRA: 0.25) and a digit
otherwise; a node at ``max_depth`` is always a digit. An operator draws 2..``max_args`` arguments
and one of the four operators uniformly. Trees are redrawn until the expression has between
``min_length`` and ``max_length`` tokens (inclusive; LRA kept 500 < length < 2000). Operators:

* ``MAX``, ``MIN``: of the arguments;
* ``MED``: ``int(np.median(args))`` as in LRA: the middle of the sorted arguments, and for an
  even count the mean of the two middle ones rounded down (``[MED 2 5 ]`` is 3);
* ``SM``: the sum modulo 10.

Tokens: digit ``k`` is ``FIRST_FREE_ID + k``; ``[MAX``, ``[MIN``, ``[MED``, ``[SM``, ``]`` follow
(ids 26..30); class ``c`` (the value) is the token ``label_base + c`` (31..40); ``vocab_size`` is
41. The sequence (``lclm.data.lra.loaders``' layout) is ``seq_len + 1`` tokens

  PAD ... PAD  BOS  expression  ANSWER  label

split into ``inputs = s[:-1]``, ``targets = s[1:]`` (int32 [seq_len]) with ``loss_mask`` (uint8
[seq_len]) 1 only at the last position. Features: ``label`` (the value), ``expression_length``
(tokens of the expression) and ``depth`` (the deepest nesting of operators: 1 for a flat
``[MAX 1 2 ]``, at most ``max_depth - 1``), all int32.

The generator draws the tree level by level with vectorised numpy (each node independent, so the
distribution is LRA's); :func:`evaluate_listops` recomputes the value from the tokens with an
explicit stack, independently of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lclm.data import token_layout
from lclm.data.lra import loaders

DIGIT_BASE = token_layout.FIRST_FREE_ID
OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
NUM_CLASSES = 10
OPERATOR_BASE = DIGIT_BASE + 10
MAX_ID, MIN_ID, MED_ID, SM_ID = range(OPERATOR_BASE, OPERATOR_BASE + 4)
END_ID = OPERATOR_BASE + 4
LABEL_BASE = END_ID + 1
VOCAB_SIZE = LABEL_BASE + NUM_CLASSES
TOKEN_NAMES = {**{DIGIT_BASE + k: str(k) for k in range(10)},
               **{OPERATOR_BASE + i: op for i, op in enumerate(OPERATORS)}, END_ID: END}
_IDS = {name: token for token, name in TOKEN_NAMES.items()}

# Scalar features of every example (name -> dtype).
LISTOPS_FEATURES = {"label": np.int32, "expression_length": np.int32, "depth": np.int32}

_MAX_ATTEMPTS = 10_000


@dataclasses.dataclass(frozen=True)
class ListOpsConfig:
  """Shape of a ListOps task (defaults: LRA's).

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; >= ``max_length + 2``.
    max_depth: depth of the deepest digit (root at depth 1); operators nest up to
      ``max_depth - 1`` deep. >= 2.
    max_args: most arguments of an operator, >= 2 (the fewest is 2).
    min_length, max_length: bounds (inclusive) on the expression's tokens.
    operator_probability: chance that a node above ``max_depth`` is an operator, in (0, 1).
  """
  seq_len: int = 2048
  max_depth: int = 10
  max_args: int = 10
  min_length: int = 500
  max_length: int = 2000
  operator_probability: float = 0.25

  def __post_init__(self):
    if self.max_depth < 2:
      raise ValueError(f"ListOpsConfig: max_depth must be >= 2 (room for one operator); got "
                       f"{self.max_depth}.")
    if self.max_args < 2:
      raise ValueError(f"ListOpsConfig: max_args must be >= 2; got {self.max_args}.")
    if not 0.0 < self.operator_probability < 1.0:
      raise ValueError(f"ListOpsConfig: operator_probability must be in (0, 1); got "
                       f"{self.operator_probability}.")
    if not 1 <= self.min_length <= self.max_length:
      raise ValueError(f"ListOpsConfig: need 1 <= min_length <= max_length; got min_length="
                       f"{self.min_length}, max_length={self.max_length}.")
    if self.seq_len < self.max_length + 2:
      raise ValueError(f"ListOpsConfig: seq_len={self.seq_len} cannot hold expressions of "
                       f"max_length={self.max_length} tokens plus BOS, ANSWER and the label; use "
                       f"seq_len >= {self.max_length + 2}.")
    longest = longest_expression(self.max_depth, self.max_args)
    if longest < self.min_length:
      raise ValueError(f"ListOpsConfig: min_length={self.min_length} is unreachable: with "
                       f"max_depth={self.max_depth} and max_args={self.max_args} the longest "
                       f"expression has {longest} tokens; lower min_length or raise the others.")
    if self.min_length > 1 and self.max_length < 4:
      raise ValueError(f"ListOpsConfig: no expression has between {self.min_length} and "
                       f"{self.max_length} tokens (a digit has 1, an operator at least 4); use "
                       "max_length >= 4 or min_length = 1.")

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  @property
  def label_base(self) -> int:
    return LABEL_BASE


def longest_expression(max_depth: int, max_args: int) -> int:
  """Tokens of the longest expression: every node an operator with ``max_args`` arguments."""
  length = 1
  for _ in range(max_depth - 1):
    length = 2 + max_args * length
  return length


def _medians(values: np.ndarray, group: np.ndarray, starts: np.ndarray, counts: np.ndarray
             ) -> np.ndarray:
  """int(np.median) of each group of ``values`` (groups contiguous, ``group`` ids ascending)."""
  ordered = values[np.lexsort((values, group))]
  low = ordered[starts + (counts - 1) // 2]
  high = ordered[starts + counts // 2]
  return (low + high) // 2


def _draw_tree(rng: np.random.Generator, config: ListOpsConfig
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]] | None, int]:
  """One tree drawn level by level: ``(levels, length)``, ``levels`` None when the expression's
  length leaves [min_length, max_length] (drawing stops as soon as it exceeds max_length).

  ``levels`` lists, from the root down, ``(kind, args)``: ``kind`` int64 [nodes] (0..3 an
  operator, -1 a digit), ``args`` int64 [nodes] (arguments of operators, 0 for digits); the
  children of a level's operators are the next level's nodes, in order.
  """
  levels, length, nodes = [], 0, 1
  for depth in range(1, config.max_depth + 1):
    if depth == config.max_depth:
      is_op = np.zeros(nodes, bool)
    elif depth == 1 and config.min_length > 1:
      is_op = np.ones(1, bool)  # A single digit is too short: same distribution, no waste.
    else:
      is_op = rng.random(nodes) < config.operator_probability
    num_ops = int(is_op.sum())
    kind = np.full(nodes, -1, np.int64)
    args = np.zeros(nodes, np.int64)
    kind[is_op] = rng.integers(0, 4, num_ops)
    args[is_op] = rng.integers(2, config.max_args + 1, num_ops)
    levels.append((kind, args))
    length += nodes + num_ops  # A digit is 1 token, an operator 2 (itself and its END).
    if length > config.max_length:
      return None, length
    nodes = int(args.sum())
    if nodes == 0:
      break
  if length < config.min_length:
    return None, length
  return levels, length


def _serialise(rng: np.random.Generator, levels) -> tuple[np.ndarray, int, int]:
  """(tokens int32 [length], value, operator nesting depth) of a tree, built bottom-up.

  Each level's nodes are written one after another; an operator's span is itself, the spans of
  its children (consecutive nodes of the level below) and END. Digits are drawn here.
  """
  tokens = values = nests = lengths = None  # Of the level below, its nodes in order.
  for kind, args in reversed(levels):
    ops = np.flatnonzero(kind >= 0)
    leaves = np.flatnonzero(kind < 0)
    node_value = np.zeros(len(kind), np.int64)
    node_nest = np.zeros(len(kind), np.int64)
    node_len = np.ones(len(kind), np.int64)
    node_value[leaves] = rng.integers(0, 10, len(leaves))
    if len(ops):
      counts = args[ops]
      starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
      group = np.repeat(np.arange(len(ops)), counts)
      op_kind = kind[ops]
      node_value[ops] = np.select(
          [op_kind == 0, op_kind == 1, op_kind == 2],
          [np.maximum.reduceat(values, starts), np.minimum.reduceat(values, starts),
           _medians(values, group, starts, counts)],
          np.add.reduceat(values, starts) % 10)
      node_nest[ops] = 1 + np.maximum.reduceat(nests, starts)
      node_len[ops] = 2 + np.add.reduceat(lengths, starts)
    ends = np.cumsum(node_len)
    begins = ends - node_len
    out = np.empty(int(ends[-1]), np.int32)
    out[begins[leaves]] = DIGIT_BASE + node_value[leaves]
    out[begins[ops]] = OPERATOR_BASE + kind[ops]
    out[ends[ops] - 1] = END_ID
    if len(ops):
      children = np.ones(len(out), bool)
      children[begins] = False
      children[ends[ops] - 1] = False
      out[children] = tokens
    tokens, values, nests, lengths = out, node_value, node_nest, node_len
  return tokens, int(values[0]), int(nests[0])


def make_listops_example(rng: np.random.Generator, config: ListOpsConfig
                         ) -> dict[str, np.ndarray]:
  """One ListOps example.

  Returns:
    ``inputs``, ``targets`` int32 [seq_len] (``PAD.. BOS expression ANSWER`` | ``.. label``),
    ``loss_mask`` uint8 [seq_len] (1 at the last position), ``label`` int32 [] (the value,
    0..9), ``expression_length`` int32 [] and ``depth`` int32 [] (operator nesting).
  """
  for _ in range(_MAX_ATTEMPTS):
    levels, _ = _draw_tree(rng, config)
    if levels is not None:
      break
  else:
    raise RuntimeError(f"ListOps: no tree of {config.min_length}..{config.max_length} tokens in "
                       f"{_MAX_ATTEMPTS} draws with {config}; widen the length bounds or raise "
                       "max_args / max_depth / operator_probability.")
  tokens, value, depth = _serialise(rng, levels)
  example = loaders.classification_example(tokens, LABEL_BASE + value, config.seq_len)
  return {**example, "label": np.int32(value), "expression_length": np.int32(len(tokens)),
          "depth": np.int32(depth)}


def _operate(op: int, args: list[int]) -> int:
  if op == MAX_ID:
    return max(args)
  if op == MIN_ID:
    return min(args)
  if op == MED_ID:
    ordered = sorted(args)
    middle = len(ordered) // 2
    if len(ordered) % 2:
      return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) // 2
  return sum(args) % 10


def evaluate_listops(tokens) -> int:
  """The value (0..9) of a ListOps expression, parsed with a stack.

  Args:
    tokens: int [n] ids of one expression; marker ids (below ``FIRST_FREE_ID``: PAD, BOS,
      ANSWER ...) are skipped, so an example's whole ``inputs`` may be given. Or a str such as
      ``"[MAX 2 9 [MIN 4 7 ] 0 ]"``.

  Raises ValueError for class tokens or unknown ids, an operator with fewer than one argument,
  an unmatched ``]``, an unclosed operator, or anything after the complete expression.
  """
  if isinstance(tokens, str):
    tokens = encode_listops(tokens)
  stack: list[tuple[int, list[int]]] = []
  result = None
  for position, token in enumerate(np.asarray(tokens).reshape(-1).tolist()):
    if token < token_layout.FIRST_FREE_ID:
      continue
    if result is not None:
      raise ValueError(f"evaluate_listops: token {token} at {position} follows the complete "
                       "expression.")
    if DIGIT_BASE <= token < DIGIT_BASE + 10:
      digit = token - DIGIT_BASE
      if stack:
        stack[-1][1].append(digit)
      else:
        result = digit
    elif OPERATOR_BASE <= token < END_ID:
      stack.append((token, []))
    elif token == END_ID:
      if not stack:
        raise ValueError(f"evaluate_listops: ']' at {position} closes no operator.")
      op, args = stack.pop()
      if not args:
        raise ValueError(f"evaluate_listops: {TOKEN_NAMES[op]} closed at {position} without "
                         "arguments.")
      value = _operate(op, args)
      if stack:
        stack[-1][1].append(value)
      else:
        result = value
    else:
      raise ValueError(f"evaluate_listops: token {token} at {position} is not a ListOps token "
                       f"(ids {DIGIT_BASE}..{END_ID}).")
  if stack:
    raise ValueError(f"evaluate_listops: {len(stack)} operator(s) not closed.")
  if result is None:
    raise ValueError("evaluate_listops: no expression in the tokens.")
  return result


def encode_listops(text: str) -> np.ndarray:
  """int32 [n]: the ids of a space-separated expression such as ``"[MAX 2 9 ]"``."""
  words = text.split()
  unknown = sorted({w for w in words if w not in _IDS})
  if unknown:
    raise ValueError(f"encode_listops: unknown words {unknown}; ListOps words are the digits "
                     f"0-9, {list(OPERATORS)} and {END!r}.")
  return np.array([_IDS[w] for w in words], np.int32)


def decode_listops(tokens) -> str:
  """A readable string of ListOps ids: digits and operators as written in LRA, PAD dropped,
  other markers as ``<NAME>``, class tokens as ``<class c>``."""
  words = []
  for token in np.asarray(tokens).reshape(-1).tolist():
    if token in TOKEN_NAMES:
      words.append(TOKEN_NAMES[token])
    elif LABEL_BASE <= token < VOCAB_SIZE:
      words.append(f"<class {token - LABEL_BASE}>")
    elif token == token_layout.PAD:
      continue
    else:
      words.append(f"<{token_layout.MARKER_NAMES.get(token, token)}>")
  return " ".join(words)


__all__ = [
    "LISTOPS_FEATURES", "ListOpsConfig", "decode_listops", "encode_listops", "evaluate_listops",
    "longest_expression", "make_listops_example",
]
