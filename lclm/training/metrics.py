"""Run metrics: a JSON-lines log and TensorBoard event files (tensorboardX, no TensorFlow).

The run directory may be local or on an object store (``gs://...``, through
``etils.epath`` and gcsfs). Objects cannot be appended to, so for a remote directory both
files are kept in memory and the whole object is rewritten on a flush:

* ``metrics.jsonl``: rows already there (a resumed run) are read once at start; a flush
  rewrites the object with every row. Rows are flushed at most every
  ``remote_flush_seconds`` (evaluation rows at once) and on :meth:`MetricsWriter.close`.
  A local file is appended to and flushed at every row, as before.
* TensorBoard: a tensorboardX record-writer factory for ``gs://`` (registered here, in
  place of tensorboardX's own, which needs google-cloud-storage) writes each event file
  through epath, rewriting it at tensorboardX's flushes (every ``flush_secs``, default 2
  minutes) and on close.
"""

from __future__ import annotations

import io
import json
import time
import uuid

import numpy as np
import tensorboardX
from etils import epath
from tensorboardX import record_writer

METRICS_FILE = "metrics.jsonl"


def is_remote(path) -> bool:
  """Whether ``path`` is a URI (``gs://``, ``s3://``, ...) rather than a local path."""
  return "://" in str(path)


class _RewrittenObject:
  """A binary file on an object store written as a whole: ``write`` buffers, ``flush`` and
  ``close`` (re)write the object with everything written so far."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()
    self._flushed = -1

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    if self._buffer.tell() != self._flushed:
      self._path.write_bytes(self._buffer.getvalue())
      self._flushed = self._buffer.tell()

  def close(self) -> None:
    self.flush()


class _EpathRecordWriterFactory:
  """tensorboardX's writer-factory interface (``open``, ``directory_check``) over epath."""

  def open(self, path: str) -> _RewrittenObject:
    return _RewrittenObject(path)

  def directory_check(self, path: str) -> None:
    del path  # Object stores need no directories.


record_writer.register_writer_factory("gs", _EpathRecordWriterFactory())


class MetricsWriter:
  """Writes scalar metrics to ``workdir/metrics.jsonl`` and TensorBoard ``workdir/tb/<split>``.

  Each row of ``metrics.jsonl`` is ``{"step", "split", "time", <metric>: float, ...}``.
  ``workdir`` is a local path or a URI (``gs://bucket/run``); see the module docstring for
  how remote files are written. Rows of an earlier run in the same directory are kept.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               remote_flush_seconds: float = 30.0):
    self.enabled = enabled
    self._tb = {}
    self._token = uuid.uuid4().hex[:8]
    self._workdir = str(workdir)
    self._remote = is_remote(workdir)
    self._remote_flush_seconds = remote_flush_seconds
    self._jsonl = None
    self._rows: list[str] = []  # Remote: every line of the file, flushed or not.
    self._pending = False
    self._last_flush = time.monotonic()
    if not enabled:
      return
    root = epath.Path(self._workdir)
    root.mkdir(parents=True, exist_ok=True)
    self._path = root / METRICS_FILE
    if self._remote:
      if self._path.exists():
        self._rows = [line for line in self._path.read_text().splitlines() if line.strip()]
    else:
      self._jsonl = open(self._path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def _writer(self, split):
    if split not in self._tb:
      # Event files are named by the second and the host; a writer of a run resumed within
      # the same second would replace the file, so each writer adds a token of its own.
      self._tb[split] = tensorboardX.SummaryWriter(
          str(epath.Path(self._workdir) / "tb" / split), filename_suffix=f".{self._token}")
    return self._tb[split]

  def write(self, step: int, metrics: dict, *, split: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), "split": split, "time": time.time(), **values})
    if self._remote:
      self._rows.append(line)
      self._pending = True
      if (split != "train" or
          time.monotonic() - self._last_flush >= self._remote_flush_seconds):
        self.flush()
    else:
      self._jsonl.write(line + "\n")
      self._jsonl.flush()
    writer = self._writer(split)
    for name, value in values.items():
      writer.add_scalar(name, value, int(step))

  def flush(self) -> None:
    """Puts every row written so far into ``metrics.jsonl`` (and TensorBoard's files)."""
    if not self.enabled:
      return
    if self._remote and self._pending:
      self._path.write_text("".join(row + "\n" for row in self._rows))
      self._pending = False
      self._last_flush = time.monotonic()
    elif self._jsonl is not None:
      self._jsonl.flush()
    for writer in self._tb.values():
      writer.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    for writer in self._tb.values():
      writer.close()
    self._tb = {}
    self.enabled = False
