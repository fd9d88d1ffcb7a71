"""Byte tokenizer: round trip on unicode, special ids, vocabulary bounds."""

import numpy as np
import pytest

from lclm.data import tokenizer as tokenizer_lib

TEXTS = ["", "hello, world", "Grüße aus Köln — ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🎉 日本語テキスト", "tab\tnew\nline\x00nul"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert ids.size == 0 or (ids.min() >= tokenizer_lib.NUM_SPECIAL_IDS and ids.max() < tok.vocab_size)
  assert tok.decode(ids) == text
  framed = tok.encode(text, add_bos=True, add_eos=True)
  assert framed[0] == tok.bos_id and framed[-1] == tok.eos_id
  np.testing.assert_array_equal(framed[1:-1], ids)
  assert tok.decode(framed) == text


def test_special_ids_and_vocab():
  tok = tokenizer_lib.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 259
  np.testing.assert_array_equal(tok.encode("A"), [ord("A") + 3])
  assert tok.decode([0, 1, ord("h") + 3, ord("i") + 3, 2, 0]) == "hi"
  with pytest.raises(ValueError, match="ids must lie"):
    tok.decode([259])
