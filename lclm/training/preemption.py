"""SIGTERM (preemption) handling: the loop asks ``requested()`` each step, saves and exits."""

from __future__ import annotations

import signal


class PreemptionGuard:
  """Context manager that turns SIGTERM into a flag instead of killing the process."""

  def __init__(self, signals=(signal.SIGTERM,), *, enabled: bool = True):
    self._signals = signals if enabled else ()
    self._previous = {}
    self._requested = False

  def requested(self) -> bool:
    return self._requested

  def _handle(self, signum, frame):
    del signum, frame  # Only set the flag: printing here could re-enter a stdout write.
    self._requested = True

  def __enter__(self):
    for sig in self._signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: signals cannot be caught here.
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
