"""Run metrics: a JSON-lines log and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorboardX


class MetricsWriter:
  """Writes scalar metrics to ``workdir/metrics.jsonl`` and TensorBoard ``workdir/tb/<split>``."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = {}
    self._workdir = workdir
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def _writer(self, split):
    if split not in self._tb:
      self._tb[split] = tensorboardX.SummaryWriter(os.path.join(self._workdir, "tb", split))
    return self._tb[split]

  def write(self, step: int, metrics: dict, *, split: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, "time": time.time(),
                                  **values}) + "\n")
    self._jsonl.flush()
    writer = self._writer(split)
    for name, value in values.items():
      writer.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    for writer in self._tb.values():
      writer.close()
