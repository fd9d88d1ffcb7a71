"""Long Range Arena: ListOps and Pathfinder generators, the shared layout, the data loaders."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from lclm.data import synthetic_source
from lclm.data import token_layout as tl
from lclm.data.lra import listops
from lclm.data.lra import loaders
from lclm.data.lra import pathfinder


def _check_layout(example, seq_len, label_token, markers=()):
  """Asserts the LRA layout PAD.. BOS content ANSWER | label; returns the content, whose only
  marker ids may be ``markers``."""
  inputs, targets, mask = example["inputs"], example["targets"], example["loss_mask"]
  assert inputs.shape == targets.shape == mask.shape == (seq_len,)
  assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.uint8
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  assert inputs[-1] == tl.ANSWER and targets[-1] == label_token
  np.testing.assert_array_equal(mask, np.eye(1, seq_len, seq_len - 1, dtype=np.uint8)[0])
  bos = int(np.flatnonzero(inputs == tl.BOS)[0])
  assert np.all(inputs[:bos] == tl.PAD)
  content = inputs[bos + 1:-1]
  assert np.all((content >= tl.FIRST_FREE_ID) | np.isin(content, markers))
  np.testing.assert_array_equal(loaders.content_tokens(inputs), content)
  return content


# ----------------------------------------------------------------------------------- ListOps


def _lra_value(words):
  """LRA's semantics, recursively over the words (int(np.median), sum mod 10)."""
  def parse(i):
    if words[i].isdigit():
      return int(words[i]), i + 1
    op, args, i = words[i], [], i + 1
    while words[i] != "]":
      value, i = parse(i)
      args.append(value)
    fn = {"[MAX": max, "[MIN": min, "[MED": lambda a: int(np.median(a)),
          "[SM": lambda a: int(np.sum(a)) % 10}[op]
    return fn(args), i + 1
  value, end = parse(0)
  assert end == len(words)
  return value


def _nesting(tokens):
  step = np.where((tokens >= listops.MAX_ID) & (tokens <= listops.SM_ID), 1,
                  np.where(tokens == listops.END_ID, -1, 0))
  depth = np.cumsum(step)
  assert depth[-1] == 0 and depth.min() >= 0
  return int(depth.max())


@pytest.mark.parametrize("config, count", [
    (listops.ListOpsConfig(), 40),
    (listops.ListOpsConfig(seq_len=100, max_depth=5, max_args=4, min_length=10, max_length=98),
     300),
    (listops.ListOpsConfig(seq_len=12, max_depth=3, max_args=3, min_length=1, max_length=10,
                           operator_probability=0.5), 300),
])
def test_listops_examples_are_well_formed_and_labelled(config, count):
  source = synthetic_source.SyntheticSource(listops.make_listops_example, config, seed=5)
  lengths, depths = [], []
  for i in range(count):
    ex = source[i]
    label = int(ex["label"])
    content = _check_layout(ex, config.seq_len, listops.LABEL_BASE + label)
    assert 0 <= label < 10 and ex["targets"].max() < config.vocab_size
    assert content.max() <= listops.END_ID
    assert len(content) == ex["expression_length"]
    assert config.min_length <= len(content) <= config.max_length
    assert listops.evaluate_listops(ex["inputs"]) == label
    assert listops.evaluate_listops(content) == label
    words = listops.decode_listops(content).split()
    assert _lra_value(words) == label
    np.testing.assert_array_equal(listops.encode_listops(" ".join(words)), content)
    assert ex["depth"] == _nesting(content) <= config.max_depth - 1
    lengths.append(len(content))
    depths.append(int(ex["depth"]))
  if config.min_length == 1:  # A bare digit (the root a leaf) occurs, as in LRA's trees.
    assert 1 in lengths and max(depths) == config.max_depth - 1
  assert len(set(lengths)) > 5


def test_listops_is_deterministic_and_fast():
  config = listops.ListOpsConfig()
  a = synthetic_source.SyntheticSource(listops.make_listops_example, config, seed=1)
  b = synthetic_source.SyntheticSource(listops.make_listops_example, config, seed=1)
  for i in (0, 7):
    for key in a[i]:
      np.testing.assert_array_equal(a[i][key], b[i][key])
  assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
  # Labels of LRA's distribution: every class occurs.
  labels = [int(a[i]["label"]) for i in range(150)]
  assert set(labels) == set(range(10))


def test_listops_evaluator_semantics_and_decoding():
  ev = listops.evaluate_listops
  assert ev("[MED 2 5 ]") == 3 and ev("[MED 5 2 ]") == 3  # int(np.median([2, 5])) = 3.
  assert ev("[MED 1 2 3 4 ]") == 2 and ev("[MED 9 1 4 ]") == 4
  assert ev("[SM 9 9 9 ]") == 7 and ev("[MAX 2 9 [MIN 4 7 ] 0 ]") == 9
  assert ev("[MIN 3 [SM 5 6 ] ]") == 1 and ev("4") == 4
  rng = np.random.default_rng(0)
  for _ in range(50):
    args = rng.integers(0, 10, rng.integers(2, 11)).tolist()
    assert ev("[MED " + " ".join(map(str, args)) + " ]") == int(np.median(args))
  ex = listops.make_listops_example(np.random.default_rng(3), listops.ListOpsConfig(
      seq_len=40, max_depth=4, min_length=10, max_length=30))
  text = listops.decode_listops(np.append(ex["inputs"], ex["targets"][-1]))
  assert text.startswith("<BOS> [") and text.endswith(f"] <ANSWER> <class {ex['label']}>")
  assert listops.ListOpsConfig().vocab_size == 41 == listops.LABEL_BASE + 10


@pytest.mark.parametrize("text, message", [
    ("[MAX 1 2 ] ]", "follows the complete"), ("] 3", "closes no operator"),
    ("[MAX 1 [MIN 2 ]", "not closed"), ("[SM ]", "without arguments"), ("", "no expression"),
    ("1 2", "follows the complete")])
def test_listops_evaluator_rejects_malformed_expressions(text, message):
  with pytest.raises(ValueError, match=message):
    listops.evaluate_listops(text)


def test_listops_evaluator_and_encoder_reject_foreign_tokens():
  with pytest.raises(ValueError, match="not a ListOps token"):
    listops.evaluate_listops([listops.MAX_ID, 17, listops.LABEL_BASE + 1, listops.END_ID])
  with pytest.raises(ValueError, match=r"unknown words \['\(', 'MAX'\]"):
    listops.encode_listops("( MAX 1 2 ]")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_depth=1), "max_depth must be >= 2"),
    (dict(max_args=1), "max_args must be >= 2"),
    (dict(operator_probability=0.0), "operator_probability must be in"),
    (dict(operator_probability=1.0), "operator_probability must be in"),
    (dict(min_length=0), "need 1 <= min_length <= max_length"),
    (dict(min_length=600, max_length=500), "need 1 <= min_length <= max_length"),
    (dict(seq_len=2001), "use seq_len >= 2002"),
    (dict(max_depth=3, max_args=2, min_length=11, max_length=20, seq_len=30),
     "longest expression has 10 tokens"),
    (dict(min_length=2, max_length=3, seq_len=10), "no expression has between 2 and 3"),
])
def test_listops_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    listops.ListOpsConfig(**kwargs)


def test_listops_gives_up_on_improbable_lengths():
  config = listops.ListOpsConfig(seq_len=20, max_depth=3, max_args=2, min_length=10,
                                 max_length=10, operator_probability=1e-4)
  with pytest.raises(RuntimeError, match="widen the length bounds"):
    listops.make_listops_example(np.random.default_rng(0), config)


# -------------------------------------------------------------------------------- Pathfinder


def _dilate(mask, radius):
  """Square dilation by ``radius`` (numpy shifts)."""
  out = np.zeros_like(mask)
  padded = np.pad(mask, radius)
  n = mask.shape[0]
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[dy:dy + n, dx:dx + n]
  return out


def _flood(mask, seed):
  """The 8-connected component of ``mask`` holding the pixel ``seed``."""
  reached = np.zeros_like(mask)
  reached[seed] = True
  while True:
    grown = _dilate(reached, 1) & mask
    if np.array_equal(grown, reached):
      return reached
    reached = grown


def _components(mask):
  """List of 8-connected components of ``mask``."""
  left, parts = mask.copy(), []
  while left.any():
    part = _flood(left, tuple(np.argwhere(left)[0]))
    parts.append(part)
    left &= ~part
  return parts


@pytest.mark.parametrize("config", [
    pathfinder.PathfinderConfig(),
    pathfinder.PathfinderConfig(resolution=24, num_distractors=0, path_length=30, dash_length=2,
                                gap_length=2, separation=5, num_levels=4, max_turn=0.4,
                                curve_intensity=0.5, seq_len=600),
])
def test_pathfinder_labels_are_true_of_the_image(config):
  source = synthetic_source.SyntheticSource(pathfinder.make_pathfinder_example, config, seed=2)
  labels = []
  for i in range(60):
    ex = source[i]
    label = int(ex["label"])
    labels.append(label)
    content = _check_layout(ex, config.seq_len, config.label_base + label)
    assert len(content) == config.resolution ** 2 and content.max() < config.label_base
    image = pathfinder.render_pathfinder(ex, config)
    dots = _components(image == 255)
    assert len(dots) == 2  # Two 3x3 dots, apart.
    assert all(d.sum() <= 9 for d in dots)
    bright = _dilate(image > 0, config.bridge_radius)
    curves = _components(bright)
    assert 2 <= len(curves) <= 2 + config.num_distractors
    reached = _flood(bright, tuple(np.argwhere(dots[0])[0]))
    assert bool((reached & dots[1]).any()) == bool(label), i
  assert 15 <= sum(labels) <= 45


def test_pathfinder_labels_are_balanced_and_deterministic():
  config = pathfinder.PathfinderConfig()
  source = synthetic_source.SyntheticSource(pathfinder.make_pathfinder_example, config, seed=9)
  labels = np.array([int(source[i]["label"]) for i in range(200)])
  assert 0.4 <= labels.mean() <= 0.6
  again = synthetic_source.SyntheticSource(pathfinder.make_pathfinder_example, config, seed=9)
  np.testing.assert_array_equal(again[11]["inputs"], source[11]["inputs"])
  assert not np.array_equal(source[11]["inputs"], source[12]["inputs"])


@pytest.mark.parametrize("num_levels", [256, 3])
def test_pathfinder_render_round_trip(num_levels):
  config = pathfinder.PathfinderConfig(num_levels=num_levels)
  for seed in range(5):
    example = pathfinder.make_pathfinder_example(np.random.default_rng(seed), config)
    rng = np.random.default_rng(seed)
    label = int(rng.integers(2))
    image = pathfinder.pathfinder_image(rng, config, label)
    assert label == example["label"] and image.dtype == np.uint8
    assert image.shape == (32, 32)
    np.testing.assert_array_equal(pathfinder.render_pathfinder(example, config), image)
    allowed = np.rint(np.arange(num_levels) * 255 / (num_levels - 1))
    assert set(np.unique(image).tolist()) <= set(allowed.tolist())
    assert {0, 255} <= set(np.unique(image).tolist())
    curve = np.rint(np.rint(0.75 * (num_levels - 1)) * 255 / (num_levels - 1))
    assert curve in image  # The curves at their own level.
  assert config.vocab_size == tl.FIRST_FREE_ID + num_levels + 2
  with pytest.raises(ValueError, match="pass the config that made it"):
    pathfinder.render_pathfinder(example, pathfinder.PathfinderConfig(resolution=16))


@pytest.mark.parametrize("kwargs, message", [
    (dict(resolution=7), "resolution must be >= 8"),
    (dict(num_distractors=-1), "num_distractors must be >= 0"),
    (dict(path_length=1), "path_length must be in"),
    (dict(path_length=257), "path_length must be in"),
    (dict(dash_length=0), "need dash_length >= 1"),
    (dict(gap_length=-1), "gap_length >= 0"),
    (dict(max_turn=4.0), "max_turn must be in"),
    (dict(gap_length=3, separation=5), "use separation >= 6"),
    (dict(num_levels=1), "num_levels must be in"),
    (dict(num_levels=300), "num_levels must be in"),
    (dict(curve_intensity=0.0), "curve_intensity must be in"),
    (dict(max_tries=0), "max_tries must be >= 1"),
    (dict(seq_len=1025), "use seq_len >= 1026"),
])
def test_pathfinder_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    pathfinder.PathfinderConfig(**kwargs)


def test_pathfinder_image_errors():
  with pytest.raises(ValueError, match="label must be 0 or 1"):
    pathfinder.pathfinder_image(np.random.default_rng(0), pathfinder.PathfinderConfig(), 2)
  tight = pathfinder.PathfinderConfig(resolution=8, path_length=16, separation=12, max_tries=2)
  with pytest.raises(RuntimeError, match="did not fit"):
    pathfinder.pathfinder_image(np.random.default_rng(0), tight, 0)


# ----------------------------------------------------------------------------------- loaders


def test_classification_layout():
  ex = loaders.classification_example(np.array([20, 21, 22]), 300, 7)
  np.testing.assert_array_equal(ex["inputs"], [tl.PAD, tl.PAD, tl.BOS, 20, 21, 22, tl.ANSWER])
  np.testing.assert_array_equal(ex["targets"], [tl.PAD, tl.BOS, 20, 21, 22, tl.ANSWER, 300])
  np.testing.assert_array_equal(ex["loss_mask"], [0, 0, 0, 0, 0, 0, 1])
  full = loaders.classification_example(np.arange(16, 21), 300, 7)
  assert full["inputs"][0] == tl.BOS
  with pytest.raises(ValueError, match="use seq_len >= 8"):
    loaders.classification_example(np.arange(16, 22), 300, 7)
  with pytest.raises(ValueError, match="PAD.. BOS content ANSWER"):
    loaders.content_tokens(np.array([tl.PAD, 20, tl.ANSWER]))


def test_imdb_example_bytes_and_truncation():
  text = "Ein großartiger Film! 10/10"
  ex = loaders.imdb_example(text, 1, seq_len=64)
  content = _check_layout(ex, 64, loaders.BYTE_LABEL_BASE + 1)
  np.testing.assert_array_equal(content, np.frombuffer(text.encode(), np.uint8) + 16)
  assert loaders.decode_bytes(ex["inputs"]) == text
  assert ex["label"] == 1 and ex["length"] == len(text.encode()) == 28
  long = loaders.imdb_example(("word " * 40).encode(), 0, seq_len=32)
  content = _check_layout(long, 32, loaders.BYTE_LABEL_BASE)
  assert long["length"] == 200 and loaders.decode_bytes(content) == ("word " * 40)[:30]
  assert long["inputs"][0] == tl.BOS and loaders.BYTE_VOCAB_SIZE == 274
  with pytest.raises(ValueError, match=r"label must be in \[0, 2\); got 2"):
    loaders.imdb_example("x", 2)
  with pytest.raises(ValueError, match="seq_len must be >= 3"):
    loaders.imdb_example("x", 0, seq_len=2)
  with pytest.raises(ValueError, match="text must be str or bytes"):
    loaders.imdb_example(3, 0)


def test_cifar_example_grayscale_pixels():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  image[0, :5] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
  ex = loaders.cifar_example(image, 7)
  content = _check_layout(ex, loaders.IMAGE_SEQ_LEN, loaders.IMAGE_LABEL_BASE + 7)
  assert ex["inputs"][0] == tl.BOS and len(content) == 1024 and ex["label"] == 7
  gray = (content - tl.FIRST_FREE_ID).reshape(32, 32)
  # tf.image.rgb_to_grayscale: trunc(luma(x / 255) * 255.5).
  np.testing.assert_array_equal(gray[0, :5], [0, 255, 76, 149, 29])
  luma = image.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140]) / 255.0
  expected = np.floor(luma * 255.5)
  assert np.abs(gray - expected).max() <= 1 and np.mean(gray == expected) > 0.99
  np.testing.assert_array_equal(loaders.cifar_example(gray.astype(np.uint8), 7)["inputs"],
                                ex["inputs"])
  assert loaders.IMAGE_VOCAB_SIZE == 282
  with pytest.raises(ValueError, match="must be 32x32"):
    loaders.cifar_example(image[:16], 1)
  with pytest.raises(ValueError, match="image must be uint8"):
    loaders.cifar_example(image.astype(np.float32), 1)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    loaders.cifar_example(image[..., :2], 1)
  with pytest.raises(ValueError, match=r"label must be in \[0, 10\); got 10"):
    loaders.cifar_example(image, 10)


def test_retrieval_example_joins_truncated_documents():
  ex = loaders.retrieval_example("first paper", b"second one, longer", 1, seq_len=23)
  content = _check_layout(ex, 23, loaders.BYTE_LABEL_BASE + 1, markers=[tl.SEP])
  assert np.sum(content == tl.SEP) == 1
  sep = int(np.flatnonzero(content == tl.SEP)[0])
  assert loaders.decode_bytes(content[:sep]) == "first paper"[:10]  # (23 - 3) // 2 = 10 bytes.
  assert loaders.decode_bytes(content[sep + 1:]) == "second one"
  assert (ex["length1"], ex["length2"], ex["label"]) == (11, 18, 1)
  with pytest.raises(ValueError, match="seq_len must be >= 5"):
    loaders.retrieval_example("a", "b", 0, seq_len=4)
  with pytest.raises(ValueError, match=r"label must be in \[0, 2\)"):
    loaders.retrieval_example("a", "b", -1)


def _write_tsv(folder, split, rows, header=False):
  with open(os.path.join(folder, f"new_aan_pairs.{split}.tsv"), "wb") as f:
    if header:
      f.write(b"label\tid1\tid2\ttext1\ttext2\n")
    for row in rows:
      f.write(b"\t".join(row) + b"\n")


def test_retrieval_source_reads_tsv(tmp_path):
  rows = [(b"1.0", b"P01-1", b"P02-2", "Über parsing".encode(), b"we cite parsing"),
          (b"0", b"A", b"B", b"one", b"two"),
          (b"1", b"C", b"D", b"x" * 50, b"y" * 50)]
  _write_tsv(tmp_path, "train", rows)
  _write_tsv(tmp_path, "eval", rows[1:], header=True)
  with open(tmp_path / "new_aan_pairs.eval.tsv", "rb+") as f:  # CRLF, no final newline.
    data = f.read().replace(b"\n", b"\r\n")[:-2]
    f.seek(0)
    f.write(data)
    f.truncate()
  with open(tmp_path / "new_aan_pairs.train.tsv", "ab") as f:
    f.write(b"\n")  # An empty line is skipped.
  source = loaders.lra_retrieval_source(tmp_path, "train", seq_len=31)
  assert len(source) == 3
  for i, (label, _, _, text1, text2) in enumerate(rows):
    ex = source[i]
    content = _check_layout(ex, 31, loaders.BYTE_LABEL_BASE + int(float(label)), [tl.SEP])
    sep = int(np.flatnonzero(content == tl.SEP)[0])
    assert loaders.decode_bytes(content[:sep]).encode() == text1[:14]
    assert loaders.decode_bytes(content[sep + 1:]).encode() == text2[:14]
    assert ex["label"] == int(float(label)) and ex["length1"] == len(text1)
  np.testing.assert_array_equal(source[-1]["inputs"], source[2]["inputs"])
  with pytest.raises(IndexError):
    source[3]
  copy = pickle.loads(pickle.dumps(source))  # Grain workers get a copy (file handle dropped).
  np.testing.assert_array_equal(copy[1]["inputs"], source[1]["inputs"])
  evaluation = loaders.lra_retrieval_source(str(tmp_path), "validation", seq_len=31)
  assert len(evaluation) == 2 and evaluation[0]["label"] == 0  # Header skipped.
  np.testing.assert_array_equal(evaluation[1]["inputs"], source[2]["inputs"])


def test_retrieval_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="there is no folder .*lra_release.gz"):
    loaders.lra_retrieval_source(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="has no new_aan_pairs.test.tsv.*tsv_data"):
    loaders.lra_retrieval_source(tmp_path, "test")
  with pytest.raises(ValueError, match="split must be one of"):
    loaders.lra_retrieval_source(tmp_path, "dev")
  with pytest.raises(ValueError, match="seq_len must be >= 5"):
    loaders.lra_retrieval_source(tmp_path, seq_len=4)
  _write_tsv(tmp_path, "train", [(b"1", b"a", b"b", b"text")])
  with pytest.raises(ValueError, match="row 0: expected 5 tab-separated fields"):
    loaders.lra_retrieval_source(tmp_path)
  _write_tsv(tmp_path, "train", [(b"0", b"a", b"b", b"t", b"u"), (b"2", b"a", b"b", b"t", b"u")])
  source = loaders.lra_retrieval_source(tmp_path)
  with pytest.raises(ValueError, match="row 1: the label must be 0 or 1; got 2.0"):
    source[1]
  _write_tsv(tmp_path, "train", [(b"0", b"a", b"b", b"t", b"u"), (b"yes", b"a", b"b", b"t", b"u")])
  with pytest.raises(ValueError, match="row 1: the label b'yes' is not a number"):
    loaders.lra_retrieval_source(tmp_path)[1]


@pytest.mark.parametrize("loader, name", [
    (loaders.lra_text_source, "imdb_reviews"), (loaders.lra_image_source, "cifar10")])
def test_tfds_loaders_explain_missing_data(tmp_path, loader, name):
  with pytest.raises(FileNotFoundError) as error:
    loader(tmp_path, "train")
  message = str(error.value)
  assert f"no folder {str(tmp_path / name)!r}" in message
  assert f"tfds build {name} --data_dir={tmp_path} --file_format=array_record" in message
  (tmp_path / name).mkdir()  # A folder without a prepared version.
  with pytest.raises(FileNotFoundError, match=f"{name}' is not prepared in .*tfds build {name}"):
    loader(str(tmp_path), "test")


def test_tfds_loader_arguments(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="seq_len must be >= 3"):
    loaders.lra_text_source(tmp_path, seq_len=2)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))
  with pytest.raises(FileNotFoundError, match="default/cifar10"):
    loaders.lra_image_source(None)


def test_mapped_source_converts_tfds_records():
  """The conversion a TFDS-backed source applies to each record (text, image)."""
  records = [{"text": b"great", "label": 1}, {"text": b"bad", "label": 0}]
  source = loaders.MappedSource(records, lambda r: loaders.imdb_example(r["text"], r["label"], 8))
  assert len(source) == 2 and loaders.decode_bytes(source[1]["inputs"]) == "bad"
  assert source[0]["targets"][-1] == loaders.BYTE_LABEL_BASE + 1
  image = np.full((32, 32, 3), 255, np.uint8)
  # pylint: disable=protected-access
  converted = loaders._convert_cifar({"image": image, "label": 3})
  assert converted["label"] == 3 and np.all(converted["inputs"][1:-1] == 16 + 255)
  assert loaders._convert_imdb(records[0], 8)["label"] == 1  # pylint: disable=protected-access
