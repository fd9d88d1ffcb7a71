"""Data mixtures: realised proportions, long-document upsampling, determinism and resume;
TextTask's held-out split check."""

from __future__ import annotations

import pytest

from lclm import tasks
from lclm.data import mixture, pipeline, text


def _first_letters(batches):
  """The first byte (as a character) of every row's first document."""
  return [chr(row[1] - 3) for b in batches for row in b["inputs"]]  # row[0] is bos.


def _write(directory, prefix, lengths):
  directory.mkdir(parents=True, exist_ok=True)
  for i, n in enumerate(lengths):
    (directory / f"{prefix}{i}.txt").write_text(prefix * n, encoding="utf-8")
  return str(directory / "*.txt")


def test_mixture_proportions_follow_the_weights():
  books = text.TokenizedTextSource(["b" * 10] * 7)
  web = text.TokenizedTextSource(["w" * 10] * 5)
  it = pipeline.make_train_iterator([books, web], mixture_weights=[0.8, 0.2], batch_size=10,
                                    seq_len=16, seed=3, pack=False)
  letters = _first_letters([next(it) for _ in range(50)])
  assert letters.count("b") / len(letters) == pytest.approx(0.8, abs=0.01)
  assert set(letters) == {"b", "w"}
  with pytest.raises(ValueError, match="mixture_weights has 1 entries for 2 sources"):
    pipeline.make_train_iterator([books, web], mixture_weights=[1.0], batch_size=2,
                                 seq_len=16, seed=0)


def test_text_task_mixture_is_deterministic_and_resumes(tmp_path):
  files = {"a": _write(tmp_path / "a", "a", [30, 40, 50]),
           "z": _write(tmp_path / "z", "z", [20, 60])}
  task = tasks.TextTask(32, train_files=files, weights={"a": 3, "z": 1}, eval_files="train")
  assert task.mixture_weights == [0.75, 0.25]
  first = [next(it) for it in [task.train_iterator(4, 0)] for _ in range(3)]
  again = task.train_iterator(4, 0)
  for expected in first:
    assert (next(again)["inputs"] == expected["inputs"]).all()
  state = again.get_state()
  following = next(again)
  resumed = task.train_iterator(4, 0)
  resumed.set_state(state)
  assert (next(resumed)["inputs"] == following["inputs"]).all()
  with pytest.raises(ValueError, match=r"TextTask.weights must name exactly the sources "
                     r"\['a', 'z'\], got \['a'\]"):
    tasks.TextTask(32, train_files=files, weights={"a": 1}, eval_files="train")


def test_long_documents_are_upsampled(tmp_path):
  assert mixture.upsampled_indices([5, 50, 7, 90], min_length=50, factor=3).tolist() == [
      0, 1, 1, 1, 2, 3, 3, 3]
  # 4 short ("s", 10 bytes) and 4 long ("l", 100 bytes) documents; long ones drawn 3x as often.
  (tmp_path / "c").mkdir()
  for i in range(4):
    (tmp_path / "c" / f"s{i}.txt").write_text("s" * 10, encoding="utf-8")
    (tmp_path / "c" / f"l{i}.txt").write_text("l" * 100, encoding="utf-8")
  task = tasks.TextTask(128, train_files={"c": str(tmp_path / "c" / "*.txt")},
                        eval_files="train", long_document_bytes=100, long_document_factor=3)
  source = task._train_sources()[0]  # pylint: disable=protected-access
  assert len(source) == 4 + 4 * 3
  it = pipeline.make_train_iterator(source, batch_size=16, seq_len=128, seed=0, pack=False)
  letters = _first_letters([next(it) for _ in range(4)])  # Four epochs: exact shares.
  assert letters.count("l") == 3 * letters.count("s") == 48


def test_text_task_requires_a_held_out_split(tmp_path):
  files = _write(tmp_path / "t", "x", [10])
  unsplit = tasks.TextTask(32, train_files=files)  # Builds (generation needs no split) ...
  with pytest.raises(ValueError, match="TextTask: no evaluation split.*eval_files = \"train\""):
    unsplit.eval_batches(32, 2, 4)  # ... but does not evaluate (training checks at launch).
  task = tasks.TextTask(32, train_files=files, eval_files="train")
  batches = task.eval_batches(32, 2, 4)
  assert int(batches[0]["loss_mask"].sum()) == 11  # bos + 10 bytes + eos -> 11 targets.
