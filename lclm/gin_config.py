"""Parsing gin files and bindings, with the error every entry point reports.

Imports gin alone, so a tool that builds models only (``experiments.benchmark_decode`` on a
lent GPU machine without the data stack) parses configurations without importing the
training loop. The entry points that train import their configurables first
(``experiments.train`` imports ``lclm.tasks``).
"""

from __future__ import annotations

import os

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
  """The gin configuration cannot be applied or describes an impossible run."""


def parse_gin(gin_files, gin_params) -> None:
  """Parses files (paths relative to the repository root or absolute) and bindings, after
  clearing any earlier configuration; raises ConfigError naming the bad file or binding."""
  gin.clear_config()
  gin.add_config_file_search_path(REPO_ROOT)
  try:
    gin.parse_config_files_and_bindings(gin_files or [], gin_params or [],
                                        finalize_config=False)
    gin.finalize()
  except (ValueError, KeyError, TypeError, OSError, SyntaxError) as error:
    raise ConfigError(f"bad gin configuration: {error}\n(files: {gin_files}, "
                      f"bindings: {gin_params})") from error
