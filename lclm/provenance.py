"""Provenance of a result: which code, software, hardware, seed and configuration made it.

:func:`collect` returns a JSON-serialisable dict that every results file of lclm carries
(``eval.json``, the experiments' ``results.json``, benchmark JSON), so that a number can be
traced back to a commit and a configuration. Nothing here raises: what cannot be found
(no git, no checkout, no jax backend) is reported as ``"unknown"``.

:func:`normalize_gin` / :func:`config_hash` give a configuration text a hash that ignores
comments, blank lines, line wrapping and the order of the bindings, so two runs with the
same bindings have the same hash (``experiments.sweeps`` reuses a run only on a match).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
from typing import Any

UNKNOWN = "unknown"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
  """Output of ``git args`` in lclm's checkout (stripped), or None when git cannot answer."""
  try:
    result = subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True,
                            timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> dict[str, Any]:
  """``{"git_commit": sha or "unknown", "git_dirty": bool or "unknown"}`` of lclm's checkout.

  Dirty means tracked files differ from the commit (untracked files are not counted). A
  copy that is not the root of a git checkout (e.g. installed into site-packages) gives
  ``"unknown"`` for both.
  """
  top = _git("rev-parse", "--show-toplevel")
  # An installed copy (site-packages) inside some other checkout is not lclm's checkout.
  commit = _git("rev-parse", "HEAD") if top and (
      os.path.realpath(top) == os.path.realpath(_REPO_ROOT)) else None
  if not commit:
    return {"git_commit": UNKNOWN, "git_dirty": UNKNOWN}
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"git_commit": commit, "git_dirty": UNKNOWN if status is None else bool(status)}


def _strip_comment(line: str) -> str:
  """``line`` without a ``#`` comment that is outside quotes."""
  quote = None
  for i, char in enumerate(line):
    if quote:
      if char == quote:
        quote = None
    elif char in "'\"":
      quote = char
    elif char == "#":
      return line[:i]
  return line


def _depth(text: str) -> int:
  """Open brackets minus closed ones in ``text`` (quotes ignored, as gin values rarely hold
  brackets inside strings; a wrong guess only affects how lines are grouped)."""
  return sum(text.count(c) for c in "([{") - sum(text.count(c) for c in ")]}")


def normalize_gin(text: str) -> str:
  """A canonical form of a gin configuration text: one statement per line, sorted.

  Comments and blank lines are dropped, a statement wrapped over several lines (indented
  continuation lines or open brackets) is joined, whitespace is collapsed and removed next
  to brackets and commas, trailing commas before a closing bracket are dropped, and the
  statements are sorted and deduplicated. Binding order, wrapping and comments thus do
  not change the result; values, names and ``include`` / ``import`` lines do.
  """
  statements: list[str] = []
  for raw in text.splitlines():
    line = _strip_comment(raw).rstrip()
    if not line.strip():
      continue
    continues = statements and (raw[:1].isspace() or _depth(statements[-1]) > 0)
    if continues:
      statements[-1] += " " + line.strip()
    else:
      statements.append(line.strip())
  canonical = set()
  for statement in statements:
    s = " ".join(statement.split())
    for char in "([{,":
      s = s.replace(char + " ", char)
    for char in ")]},":
      s = s.replace(" " + char, char)
    for char in ")]}":
      s = s.replace("," + char, char)
    s = s.replace(" = ", "=").replace(" =", "=").replace("= ", "=")
    canonical.add(s)
  return "\n".join(sorted(canonical))


def config_hash(text: str) -> str:
  """sha256 (hex) of :func:`normalize_gin` of ``text``."""
  return hashlib.sha256(normalize_gin(text).encode("utf-8")).hexdigest()


def _versions() -> dict[str, str]:
  versions = {"python_version": platform.python_version()}
  for name in ("jax", "jaxlib", "flax"):
    try:
      module = __import__(name)
      versions[f"{name}_version"] = getattr(module, "__version__", UNKNOWN)
    except ImportError:
      versions[f"{name}_version"] = UNKNOWN
  return versions


def _devices() -> dict[str, Any]:
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count()}
  except Exception:  # pylint: disable=broad-except  (no backend: provenance never fails)
    return {"platform": UNKNOWN, "device_kind": UNKNOWN, "device_count": UNKNOWN,
            "local_device_count": UNKNOWN, "process_count": UNKNOWN}


def _operative_gin() -> str:
  """The operative gin config when a run has used one, else every parsed binding."""
  try:
    import gin  # pylint: disable=g-import-not-at-top
    return gin.operative_config_str() or gin.config_str()
  except Exception:  # pylint: disable=broad-except
    return ""


def gin_seed() -> int | None:
  """The seed of the gin-configured training run: ``train.seed`` when bound, ``train``'s
  default (0) when ``train`` ran with it unbound, else None."""
  try:
    import gin  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    return int(gin.query_parameter("train.seed"))
  except (ValueError, TypeError):
    pass
  operative = gin.operative_config_str()
  for line in operative.splitlines():
    if line.replace(" ", "").startswith("train.seed="):
      try:
        return int(line.split("=", 1)[1].strip())
      except ValueError:
        return None
  return 0 if "\ntrain." in "\n" + operative else None


def collect(*, seed: int | None = None, gin_config: str | None = None,
            include_gin: bool = True) -> dict[str, Any]:
  """Provenance of a result, JSON-serialisable.

  Args:
    seed: the run's seed (None when there is none, e.g. a benchmark).
    gin_config: the gin configuration text of the result (e.g. a run's ``config.gin``);
      default: gin's operative configuration in this process (every parsed binding when
      nothing has been used yet; empty when nothing is parsed).
    include_gin: False leaves out the configuration (its hash and text).

  Returns:
    ``{"git_commit", "git_dirty", "python_version", "jax_version", "jaxlib_version",
    "flax_version", "platform", "device_kind", "device_count", "local_device_count",
    "process_count", "seed", "utc_time"}`` and, with ``include_gin``, ``"gin_config_hash"``
    (:func:`config_hash`, None for an empty configuration) and ``"gin_config"`` (the text).
  """
  record: dict[str, Any] = {**git_state(), **_versions(), **_devices(), "seed": seed,
                            "utc_time": datetime.datetime.now(datetime.timezone.utc)
                            .isoformat(timespec="seconds")}
  if include_gin:
    text = _operative_gin() if gin_config is None else gin_config
    record["gin_config_hash"] = config_hash(text) if text.strip() else None
    record["gin_config"] = text
  return record
