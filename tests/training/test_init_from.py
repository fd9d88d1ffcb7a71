"""Params-only restore (restore_params) and train.init_from on a tiny model: a new run starts
from another run's parameters at step 0 with a fresh optimizer state (even with other
position options), resuming wins over init_from, mismatched models are refused by name."""

from __future__ import annotations

import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import train as train_main
from lclm import sharding
from lclm.model import DecoderLM, layer_stack
from lclm.training import checkpointing, loop, optimizer, restore, step
from tests.training.test_train_loop import TINY

QUICK = ["train.total_steps = 4", "train.checkpoint_every = 2", "train.eval_examples = 8",
         "train.eval_length_multipliers = (1,)"]
VOCAB = 64  # MqarTask.vocab_size in TINY


def _configure(*extra):
  train_main.parse_gin([], TINY + QUICK + list(extra))


def _factory(**options):
  return lambda: DecoderLM(vocab_size=VOCAB, rngs=nnx.Rngs(0), **options)


def _flat(params):
  """{path string: numpy value} of an nnx.State of parameters."""
  return {"/".join(str(k) for k in p): np.asarray(jax.device_get(v.get_value()))
          for p, v in nnx.to_flat_state(params)}


def _assert_same(got, want):
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """Run A: 4 steps, checkpoints at 2 and 4; its final parameters (full-state restore)."""
  workdir = str(tmp_path_factory.mktemp("source"))
  _configure()
  assert loop.train(workdir)["status"] == "completed"
  # The final parameters, read the way a resumed run reads them: the whole train state.
  mesh, rules = sharding.make_mesh(), sharding.axis_rules()
  state, _ = step.init_train_state(_factory(), optimizer.make_optimizer(4), mesh, rules)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            async_save=False)
  at_step, state = checkpointer.restore(abstract)
  checkpointer.close()
  assert at_step == 4
  return workdir, jax.device_get(state.params)


def test_restore_params_equals_the_full_state_restore(source_run):
  workdir, final = source_run
  _configure()
  at_step, model = restore.restore_params(workdir, _factory())
  assert at_step == 4
  _assert_same(nnx.state(model, nnx.Param), final)
  leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
  assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
  # The checkpoints/ directory itself, and the legacy entry point, give the same.
  at_step, same = restore.restore_params(os.path.join(workdir, "checkpoints"), _factory())
  assert at_step == 4
  _assert_same(nnx.state(same, nnx.Param), final)
  at_step, legacy = restore.restore_trained_model(workdir, _factory(), total_steps=4)
  _assert_same(nnx.state(legacy, nnx.Param), final)


def test_restore_params_into_other_positions_and_dtype(source_run):
  workdir, final = source_run
  _configure()
  _, model = restore.restore_params(
      workdir, _factory(position_options={"rope_theta": 500000.0, "rope_scaling": None},
                        param_dtype=jax.numpy.bfloat16))
  params = nnx.state(model, nnx.Param)
  assert {v.dtype for v in jax.tree.leaves(params)} == {jax.numpy.dtype("bfloat16")}
  want = jax.tree.map(lambda x: np.asarray(x.astype(jax.numpy.bfloat16)), final)
  _assert_same(params, want)


def test_restore_params_refuses_another_model(source_run):
  workdir, _ = source_run
  _configure()
  with pytest.raises(ValueError, match=r"parameter 'embed/embedding' has shape \(80, 32\) "
                     r"in the model but \(64, 32\) in the checkpoint"):
    restore.restore_params(workdir, lambda: DecoderLM(vocab_size=80, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"parameter 'blocks/1/.*' .* is not in the checkpoint"):
    restore.restore_params(workdir, _factory(layer_pattern=("attention", "attention")))


def test_restore_params_errors(source_run, tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    restore.restore_params(str(tmp_path / "missing"), _factory())
  with pytest.raises(FileNotFoundError, match="neither an lclm run directory"):
    restore.restore_params(str(tmp_path), _factory())
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    restore.restore_params(str(tmp_path), _factory())
  # A damaged newest checkpoint: the one before is used, nothing is renamed.
  workdir = str(tmp_path / "copy")
  shutil.copytree(source_run[0], workdir)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  _configure()
  at_step, _ = restore.restore_params(workdir, _factory())
  assert at_step == 2
  assert "checkpoint at step 4" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(checkpointing.UnreadableCheckpointsError, match="none of the checkpoints"):
    restore.restore_params(workdir, _factory())


@pytest.fixture
def first_states(monkeypatch):
  """Records (on the host) the train state each run's first train step receives."""
  states, make = [], step.make_train_step

  def recording_make_train_step(*args, **kwargs):
    train_step = make(*args, **kwargs)
    recorded = []

    def wrapped(state, batch):
      if not recorded:
        recorded.append(1)
        states.append(jax.device_get(state))
      return train_step(state, batch)

    return wrapped

  monkeypatch.setattr(step, "make_train_step", recording_make_train_step)
  return states


def _optimizer_leaves(state):
  """(step counters, moment arrays) of the optax state."""
  leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  counts = [leaf for path, leaf in leaves if "count" in jax.tree_util.keystr(path)]
  moments = [leaf for path, leaf in leaves if "count" not in jax.tree_util.keystr(path)]
  return counts, moments


def _assert_fresh_optimizer_state(state):
  counts, moments = _optimizer_leaves(state)
  assert counts and all(int(c) == 0 for c in counts)
  assert moments and all(not np.any(np.asarray(m)) for m in moments)


def test_init_from_a_run_starts_at_step_0_with_its_params(source_run, tmp_path, first_states,
                                                          capsys):
  source, final = source_run
  workdir = str(tmp_path / "b")
  _configure(f"train.init_from = '{source}'", "ROPE_THETA = 500000.0",
             "train.stop_after_steps = 1")
  summary = loop.train(workdir)
  assert summary["status"] == "stopped" and summary["step"] == 1
  out = capsys.readouterr().out
  assert "train.init_from: initialised the" in out and "step 4" in out
  (initial,) = first_states
  assert int(initial.step) == 0
  _assert_same(initial.params, final)
  _assert_fresh_optimizer_state(initial)
  # A second launch resumes from its own checkpoint (step 1): init_from is ignored.
  _configure(f"train.init_from = '{source}'", "ROPE_THETA = 500000.0",
             "train.stop_after_steps = 2")
  summary = loop.train(workdir)
  assert summary["status"] == "stopped" and summary["step"] == 2
  assert "ignored: this run resumes from its own checkpoint at step 1" in capsys.readouterr().out
  resumed = first_states[-1]  # the run's own state at step 1, optimizer state included
  assert len(first_states) == 2 and int(resumed.step) == 1
  assert all(int(c) == 1 for c in _optimizer_leaves(resumed)[0])


def test_init_from_refuses_a_mismatched_model(source_run, tmp_path):
  _configure(f"train.init_from = '{source_run[0]}'", "DecoderLM.features = 48")
  with pytest.raises(loop.ConfigurationError,
                     match=r"parameter 'blocks/0/.*' has shape \(48,.*\) in the model but "
                     r"\(32,.*\) in the checkpoint"):
    loop.train(str(tmp_path / "b"))


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: str(p), "neither an lclm run directory"),
])
def test_init_from_bad_paths_fail_before_compiling(tmp_path, make, message, monkeypatch):
  monkeypatch.setattr(step, "init_train_state", None)  # Never reached.
  _configure(f"train.init_from = '{make(tmp_path)}'")
  with pytest.raises(loop.ConfigurationError, match=message):
    loop.train(str(tmp_path / "run"))


def test_init_from_a_hugging_face_folder(source_run, tmp_path, first_states, monkeypatch):
  """The HF branch with lclm.hf.load_pretrained stubbed (returning run A's model in bfloat16):
  its parameters are cast to the state's float32 and copied in; a mismatch is named."""
  import lclm
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  _configure()
  _, model = restore.restore_params(source_run[0], _factory(param_dtype=jax.numpy.bfloat16))
  calls = []

  def load_pretrained(path, *, dtype=None, mesh=None, rules=None):
    calls.append((path, dtype, mesh is not None))
    del rules
    return model

  fake = types.ModuleType("lclm.hf")
  fake.load_pretrained = load_pretrained
  monkeypatch.setitem(sys.modules, "lclm.hf", fake)
  monkeypatch.setattr(lclm, "hf", fake, raising=False)
  _configure(f"train.init_from = '{folder}'", "train.stop_after_steps = 1")
  loop.train(str(tmp_path / "b"))
  assert calls == [(str(folder), None, True)]  # Read straight into the run's shardings.
  (initial,) = first_states
  assert int(initial.step) == 0
  assert {v.dtype for v in jax.tree.leaves(initial.params)} == {np.dtype("float32")}
  want = jax.tree.map(lambda x: np.asarray(x.astype(jax.numpy.bfloat16)).astype(np.float32),
                      source_run[1])
  _assert_same(initial.params, want)
  _assert_fresh_optimizer_state(initial)
  _configure(f"train.init_from = '{folder}'", "MqarTask.vocab_size = 80")
  with pytest.raises(loop.ConfigurationError,
                     match=r"'embed/embedding' has shape \(80, 32\) in the configured model "
                     r"but \(64, 32\) in the loaded model"):
    loop.train(str(tmp_path / "c"))


def test_init_from_a_saved_hugging_face_checkpoint(tmp_path, first_states):
  """The real lclm.hf: a model of the run's configuration (no short convolution: Llama has
  none) written as a Llama checkpoint is the new run's starting point, parameter for
  parameter, with other positions (rope_theta) and scanned layers in the new run."""
  hf = pytest.importorskip("lclm.hf")
  _configure("DecoderLM.short_conv_size = 0")
  model = DecoderLM(vocab_size=VOCAB, rngs=nnx.Rngs(7))
  folder = str(tmp_path / "llama")
  hf.save_pretrained(model, folder, architecture="llama")
  _configure("DecoderLM.short_conv_size = 0", f"train.init_from = '{folder}'",
             "ROPE_THETA = 500000.0", "train.stop_after_steps = 1",
             "DecoderLM.scan_layers = True")
  loop.train(str(tmp_path / "b"))
  (initial,) = first_states
  assert int(initial.step) == 0
  stacked = layer_stack.stack_params(
      {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}, 1)
  _assert_same(initial.params, nnx.from_flat_state(
      [(p, nnx.Param(np.asarray(v))) for p, v in stacked.items()]))
  _assert_fresh_optimizer_state(initial)


def test_restore_params_converts_between_scanned_and_unscanned(source_run, tmp_path):
  workdir, final = source_run
  _configure()
  # The unscanned run's checkpoint into a scanned model: the layers stacked.
  _, scanned = restore.restore_params(workdir, _factory(scan_layers=True))
  params = nnx.state(scanned, nnx.Param)
  kernel = params["scanned_blocks"][0]["mixer"]["q_proj"]["kernel"].get_value()
  np.testing.assert_array_equal(kernel[0], final["blocks"][0]["mixer"]["q_proj"]["kernel"]
                                .get_value())
  assert kernel.shape[0] == 1
  # A scanned checkpoint into the unscanned model: the same parameters again.
  mesh, rules = sharding.make_mesh(), sharding.axis_rules()
  state, _ = step.init_train_state(_factory(scan_layers=True), optimizer.make_optimizer(4),
                                   mesh, rules)
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  checkpointer.save(7, state.replace(params=params), force=True)
  checkpointer.close()
  at_step, unscanned = restore.restore_params(str(tmp_path), _factory())
  assert at_step == 7
  _assert_same(nnx.state(unscanned, nnx.Param), final)
