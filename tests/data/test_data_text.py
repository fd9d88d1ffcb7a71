"""Text LM sources on a tiny corpus written by the test: local files and a TFDS text dataset."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lclm.data import pipeline
from lclm.data import text
from lclm.data import tokenizer as tokenizer_lib

TOK = tokenizer_lib.ByteTokenizer()
DOCS = ["The first document.\nIt has two lines.", "Zweites Dokument: Grüße! ✓",
        "third " * 40, "4"]


def _write_corpus(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
  (tmp_path / "b.txt").write_text(DOCS[1], encoding="utf-8")
  (tmp_path / "sub" / "c.txt").write_text(DOCS[2] + "\n\n\n" + DOCS[3], encoding="utf-8")
  (tmp_path / "skip.md").write_text("not text", encoding="utf-8")


def _check_document(example, doc):
  ids = np.concatenate([example["inputs"][:1], example["targets"]])
  np.testing.assert_array_equal(ids, TOK.encode(doc, add_bos=True, add_eos=True))
  np.testing.assert_array_equal(example["targets"][:-1], example["inputs"][1:])
  assert example["loss_mask"].sum() == len(example["inputs"])


def test_text_files_one_document_per_file(tmp_path):
  _write_corpus(tmp_path)
  source = text.text_file_source(str(tmp_path / "**" / "*.txt"))
  assert len(source) == 3
  _check_document(source[0], DOCS[0])
  _check_document(source[1], DOCS[1])
  _check_document(source[2], DOCS[2] + "\n\n\n" + DOCS[3])


def test_text_files_split_into_paragraphs(tmp_path):
  _write_corpus(tmp_path)
  source = text.text_file_source(str(tmp_path / "**" / "*.txt"), document_separator="\n\n")
  assert len(source) == 4  # the empty piece between the blank lines is dropped
  _check_document(source[2], DOCS[2])
  _check_document(source[3], "\n" + DOCS[3])


def test_no_matching_file_raises(tmp_path):
  with pytest.raises(ValueError, match="No file matches"):
    text.text_file_source(str(tmp_path / "*.txt"))


def test_text_source_through_the_pipeline_keeps_every_token(tmp_path):
  _write_corpus(tmp_path)
  source = text.text_file_source(str(tmp_path / "**" / "*.txt"))
  batches = pipeline.make_eval_batches(source, batch_size=2, seq_len=64, pack=True,
                                       long_examples="split")
  rows = [(b["targets"][r], b["segment_ids"][r]) for b in batches for r in range(2)]
  pieces = []
  for targets, seg in rows:
    pieces += [targets[seg == s] for s in range(1, seg.max() + 1)]
  got = np.concatenate(pieces)
  want = np.concatenate([source[i]["targets"] for i in range(len(source))])
  np.testing.assert_array_equal(np.sort(got), np.sort(want))
  assert max(len(p) for p in pieces) == 64  # the 240-byte document was cut into pieces


class LclmTestTinyText(tfds.core.GeneratorBasedBuilder):
  """Three short documents in the train split, one in test, in a ``text`` feature."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(DOCS[:3]), "test": self._generate_examples(DOCS[3:])}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def test_tfds_text_source_by_name(tmp_path):
  LclmTestTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = text.tfds_text_source("lclm_test_tiny_text", split="train", data_dir=str(tmp_path))
  assert len(source) == 3
  for i in range(3):
    _check_document(source[i], DOCS[i])
  with pytest.raises(KeyError, match="no feature 'body'"):
    text.tfds_text_source("lclm_test_tiny_text", split="test", data_dir=str(tmp_path),
                          feature="body")[0]
