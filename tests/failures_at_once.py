"""A pytest plugin: each failure's traceback is printed when the test fails, not at the end.

A run stopped at a time limit (``make device-check`` on a lent GPU, whose test step has a
few minutes) then still shows why its failed tests failed. ``tests/conftest.py`` loads it
when ``LCLM_FAILURES_AT_ONCE=1``; ``pytest -p failures_at_once`` (with ``tests`` on the
path) loads it anywhere. Under pytest-xdist the controller prints, the workers stay quiet.
"""

from __future__ import annotations

MAX_LINES = 80  # The end of a long traceback: the assertion and the frames nearest to it.

_config = None


def pytest_configure(config):
  global _config  # pylint: disable=global-statement
  _config = None if hasattr(config, "workerinput") else config


def pytest_runtest_logreport(report):
  if _config is None or not report.failed:
    return
  reporter = _config.pluginmanager.get_plugin("terminalreporter")
  if reporter is None:
    return
  lines = report.longreprtext.splitlines()
  reporter.write_line("")
  reporter.write_line(f"[failed at once] {report.nodeid} ({report.when}), "
                      f"last {min(len(lines), MAX_LINES)} of {len(lines)} lines:")
  for line in lines[-MAX_LINES:]:
    reporter.write_line("  " + line)
