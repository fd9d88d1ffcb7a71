"""lclm.provenance: the record every results file carries, and the configuration hash that
ignores comments, wrapping and binding order."""

from __future__ import annotations

import datetime
import subprocess

import jax
import pytest

from lclm import provenance

CONFIG = """# Parameters for train:
train.batch_size = 8
train.eval_length_multipliers = (1, 2, 4)

MqarTask.vocab_size = 64  # a comment
LAYER_PATTERN = ['attention', 'mamba2']
"""
SAME = """LAYER_PATTERN = [
    'attention',
    'mamba2',
]
MqarTask.vocab_size=64
train.eval_length_multipliers = (1, 2, 4)
# another comment
train.batch_size = 8
"""


def test_config_hash_ignores_comments_wrapping_and_order():
  assert provenance.normalize_gin(CONFIG) == provenance.normalize_gin(SAME)
  assert provenance.config_hash(CONFIG) == provenance.config_hash(SAME)
  assert provenance.normalize_gin(CONFIG).splitlines() == [
      "LAYER_PATTERN=['attention','mamba2']", "MqarTask.vocab_size=64",
      "train.batch_size=8", "train.eval_length_multipliers=(1,2,4)"]
  changed = SAME.replace("train.batch_size = 8", "train.batch_size = 16")
  assert provenance.config_hash(changed) != provenance.config_hash(CONFIG)
  # A '#' inside a string is a value, not a comment.
  assert provenance.normalize_gin("x.name = 'a#b'") == "x.name='a#b'"


def test_collect_records_code_software_devices_seed_and_config():
  record = provenance.collect(seed=7, gin_config=CONFIG)
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance._REPO_ROOT,  # pylint: disable=protected-access
                        capture_output=True, text=True, check=False).stdout.strip()
  assert record["git_commit"] == (head or "unknown")
  assert isinstance(record["git_dirty"], bool) or record["git_dirty"] == "unknown"
  assert record["jax_version"] == jax.__version__ and record["seed"] == 7
  assert record["device_count"] == jax.device_count()
  assert record["device_kind"] == jax.devices()[0].device_kind
  assert record["process_count"] == jax.process_count()
  assert record["gin_config"] == CONFIG
  assert record["gin_config_hash"] == provenance.config_hash(CONFIG)
  when = datetime.datetime.fromisoformat(record["utc_time"])
  now = datetime.datetime.now(datetime.timezone.utc)
  assert when.utcoffset() == datetime.timedelta(0) and abs((now - when).total_seconds()) < 60
  assert "gin_config" not in provenance.collect(include_gin=False)
  assert provenance.collect(gin_config="")["gin_config_hash"] is None


def test_outside_a_checkout_or_without_git_the_commit_is_unknown(monkeypatch, tmp_path):
  monkeypatch.setattr(provenance, "_REPO_ROOT", str(tmp_path))  # not a git checkout
  assert provenance.git_state() == {"git_commit": "unknown", "git_dirty": "unknown"}
  inside = tmp_path / "site-packages"  # inside another checkout, not its root
  inside.mkdir()
  subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
  monkeypatch.setattr(provenance, "_REPO_ROOT", str(inside))
  assert provenance.git_state()["git_commit"] == "unknown"

  def no_git(*args, **kwargs):
    raise FileNotFoundError("git")

  monkeypatch.setattr(provenance.subprocess, "run", no_git)
  assert provenance.collect(gin_config="")["git_commit"] == "unknown"


@pytest.mark.parametrize("bindings, seed", [(["train.seed = 5"], 5), ([], None)])
def test_gin_seed(bindings, seed):
  import gin
  from lclm.training import loop  # noqa: F401  (registers train)
  gin.parse_config(bindings)
  assert provenance.gin_seed() == seed
