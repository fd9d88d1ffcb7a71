"""Byte-level tokenizer: UTF-8 bytes shifted past a few special ids. Needs no vocabulary file."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL_IDS = 3


class ByteTokenizer:
  """Maps text to ids ``byte + 3``; ids 0, 1, 2 are pad, bos and eos.

  ``vocab_size`` is 259. Any text round-trips: ``decode(encode(s)) == s``.
  """

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  @property
  def vocab_size(self) -> int:
    return 256 + NUM_SPECIAL_IDS

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """Returns int32 ids [num_bytes (+1 per added special)] of the UTF-8 bytes of ``text``."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL_IDS
    parts = ([np.array([BOS_ID], np.int32)] if add_bos else []) + [data]
    if add_eos:
      parts.append(np.array([EOS_ID], np.int32))
    return np.concatenate(parts) if len(parts) > 1 else data

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Returns the text of ``ids``; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ids must lie in [0, {self.vocab_size}); got values in "
                       f"[{ids.min()}, {ids.max()}].")
    data = (ids[ids >= NUM_SPECIAL_IDS] - NUM_SPECIAL_IDS).astype(np.uint8)
    return data.tobytes().decode("utf-8", errors="replace")
