"""experiments.fit_check: arguments and gin validation, the memory report and its verdict
(from a fake memory_analysis), and, with a libtpu.so (``LCLM_LIBTPU_PATH``), the compile of
the quickstart train step for a v5e:2x2 topology."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest
from flax import nnx

from experiments import fit_check, train as train_main
from lclm.model import DecoderLM

GIB = 1024 ** 3
MIB = 1024 ** 2
QUICKSTART = "configs/experiments/quickstart.gin"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

requires_libtpu = pytest.mark.skipif(
    not os.environ.get(fit_check.LIBTPU_ENV),
    reason=f"set {fit_check.LIBTPU_ENV} to a libtpu.so to compile for a TPU topology")


def _stats(arguments, outputs, temporaries, code, alias):
  return types.SimpleNamespace(
      argument_size_in_bytes=arguments, output_size_in_bytes=outputs,
      temp_size_in_bytes=temporaries, generated_code_size_in_bytes=code,
      alias_size_in_bytes=alias)


# ---------------------------------------------------------------- topology and libtpu


@pytest.mark.parametrize("topology, generation, hbm", [
    ("v5e:2x2", "v5e", 16), ("v5e:4x4", "v5e", 16), ("v4:2x2x1", "v4", 32),
    ("v5p:2x2x2", "v5p", 95), ("v6e:4x8", "v6e", 32)])
def test_topology_gives_the_chip_hbm(topology, generation, hbm):
  assert fit_check.parse_topology(topology) == (generation, hbm)


def test_topology_errors_and_hbm_override():
  with pytest.raises(fit_check.FitCheckError, match="--topology must be.*'v5e-16'"):
    fit_check.parse_topology("v5e-16")
  with pytest.raises(fit_check.FitCheckError, match="no HBM size known.*'v7x'.*--hbm_gib"):
    fit_check.parse_topology("v7x:2x2")
  assert fit_check.parse_topology("v7x:2x2", hbm_gib=192) == ("v7x", 192.0)
  assert fit_check.parse_topology("v5e:2x2", hbm_gib=15.5) == ("v5e", 15.5)
  with pytest.raises(fit_check.FitCheckError, match="--hbm_gib must be positive"):
    fit_check.parse_topology("v5e:2x2", hbm_gib=0)


def test_libtpu_lookup_order_and_missing_libtpu(tmp_path, monkeypatch):
  library = tmp_path / "libtpu.so"
  library.write_bytes(b"")
  monkeypatch.setenv(fit_check.LIBTPU_ENV, str(library))
  assert fit_check.find_libtpu() == str(library)
  with pytest.raises(fit_check.FitCheckError, match="--libtpu='/nope/libtpu.so' is not a file"):
    fit_check.find_libtpu("/nope/libtpu.so")
  monkeypatch.delenv(fit_check.LIBTPU_ENV)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  monkeypatch.setattr(fit_check.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(fit_check.FitCheckError, match="pip install libtpu.*LCLM_LIBTPU_PATH"):
    fit_check.find_libtpu()


def test_main_rejects_bad_arguments_before_starting_jax(monkeypatch, capsys):
  monkeypatch.delenv(fit_check._CHILD_ENV, raising=False)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  monkeypatch.delenv(fit_check.LIBTPU_ENV, raising=False)
  monkeypatch.setattr(fit_check.importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(fit_check, "_reexecute", lambda *a: pytest.fail("must not re-execute"))
  assert fit_check.main([f"--gin_file={QUICKSTART}", "--topology=v5e"]) == 2
  assert "--topology must be" in capsys.readouterr().err
  assert fit_check.main(["--topology=v5e:2x2"]) == 2
  assert "at least one --gin_file" in capsys.readouterr().err
  assert fit_check.main([f"--gin_file={QUICKSTART}", "--topology=v5e:2x2"]) == 2
  assert "no libtpu found" in capsys.readouterr().err


def test_main_reexecutes_with_libtpu_on_the_path(tmp_path, monkeypatch):
  library = tmp_path / "libtpu.so"
  library.write_bytes(b"")
  monkeypatch.delenv(fit_check._CHILD_ENV, raising=False)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  calls = []
  monkeypatch.setattr(fit_check, "_reexecute", lambda argv, path: calls.append((argv, path)) or 1)
  argv = [f"--gin_file={QUICKSTART}", "--topology=v5e:2x2", f"--libtpu={library}"]
  assert fit_check.main(argv) == 1  # the child's exit code
  assert calls == [(argv, str(library))]


# ---------------------------------------------------------------- gin settings


def test_train_settings_come_from_gin_with_train_defaults():
  train_main.parse_gin([QUICKSTART], ["train.grad_accum_steps = 4"])
  settings = fit_check.train_settings()
  assert (settings.batch_size, settings.grad_accum_steps, settings.seed,
          settings.total_steps) == (64, 4, 0, 1000)
  assert (settings.task.vocab_size, settings.task.seq_len) == (256, 64)


@pytest.mark.parametrize("binding, message", [
    ("train.batch_size = 0", "train.batch_size must be a positive int, got 0"),
    ("train.grad_accum_steps = 3", "grad_accum_steps=3 must divide train.batch_size=64"),
])
def test_train_settings_reject_impossible_values(binding, message):
  train_main.parse_gin([QUICKSTART], [binding])
  with pytest.raises(fit_check.FitCheckError, match=message):
    fit_check.train_settings()


def test_train_settings_need_the_required_bindings():
  train_main.parse_gin(["configs/model/tiny.gin"], [])
  with pytest.raises(fit_check.FitCheckError, match="train.task is required"):
    fit_check.train_settings()


def test_bad_gin_is_a_configuration_error_before_any_compile(capsys):
  args = fit_check.argument_parser().parse_args(
      [f"--gin_file={QUICKSTART}", "--gin_param=train.no_such_option = 1",
       "--topology=v5e:2x2"])
  assert fit_check._run(args) == 2
  assert "bad gin configuration" in capsys.readouterr().err
  args.gin_param = ["train.batch_size = -8"]
  assert fit_check._run(args) == 2
  assert "train.batch_size must be a positive int, got -8" in capsys.readouterr().err


def test_batch_must_divide_over_the_batch_shards():
  mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 1, "context": 1})
  settings = fit_check.TrainSettings(task=None, batch_size=16, grad_accum_steps=4, seed=0,
                                     total_steps=1)
  with pytest.raises(fit_check.FitCheckError, match=r"micro-batch 4 .* data x fsdp = 8"):
    fit_check._check_batch(settings, mesh)
  fit_check._check_batch(settings.__class__(**{**settings.__dict__, "grad_accum_steps": 2}),
                         mesh)


# ---------------------------------------------------------------- the memory report


def test_memory_report_totals_and_verdict():
  memory = fit_check.memory_report(
      _stats(3 * GIB, 3 * GIB, 9 * GIB, 256 * MIB, 3 * GIB), 16 * GIB)
  assert memory["total_bytes"] == 12 * GIB + 256 * MIB
  assert memory["margin_bytes"] == 4 * GIB - 256 * MIB
  assert memory["fits"] and memory["fraction_of_hbm"] == pytest.approx(12.25 / 16)
  text = fit_check.format_memory(memory)
  assert "  arguments            3.000 GiB" in text
  assert "  generated code       256.0 MiB" in text
  assert "  aliased (saved)   -  3.000 GiB" in text
  assert "  total               12.250 GiB  (76.6% of 16 GiB HBM)" in text
  assert text.endswith("verdict: FITS: 3.750 GiB to spare per device")

  over = fit_check.memory_report(_stats(10 * GIB, 10 * GIB, 7 * GIB, 0, 10 * GIB), 16 * GIB)
  assert over["total_bytes"] == 17 * GIB and not over["fits"]
  assert fit_check.format_memory(over).endswith(
      "verdict: DOES NOT FIT: over by 1.000 GiB per device")
  # Fields a backend leaves out count 0; no analysis at all is an error.
  partial = fit_check.memory_report(types.SimpleNamespace(temp_size_in_bytes=5), 10)
  assert (partial["total_bytes"], partial["margin_bytes"]) == (5, 5)
  with pytest.raises(fit_check.FitCheckError, match="no memory analysis"):
    fit_check.memory_report(None, 16 * GIB)


@pytest.mark.parametrize("message, used, available", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (148.98G) exceeds available HBM (15.75G).", 148.98 * GIB, 15.75 * GIB),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
     "hbm. Used 17.5G of 15.5G hbm. Exceeded hbm capacity by 2.0G.\n\nTotal hbm usage ...",
     17.5 * GIB, 15.5 * GIB),
    # Over the compiler's budget, under the chip's 16 GiB: still over, by 0.125 GiB.
    ("RESOURCE_EXHAUSTED: ... HLO temporaries (15.875G) exceeds available HBM (15.75G).",
     15.875 * GIB, 15.75 * GIB),
])
def test_compiler_out_of_memory_is_does_not_fit(message, used, available):
  memory = fit_check.out_of_memory_report(message, 16 * GIB)
  assert not memory["fits"] and memory["temp_bytes"] is None
  assert memory["total_bytes"] == int(used)
  assert memory["compiler_available_bytes"] == int(available)
  assert memory["margin_bytes"] == int(available) - int(used)
  text = fit_check.format_memory(memory)
  assert message.splitlines()[0] in text
  over = fit_check.format_bytes(int(used) - int(available)).strip()
  assert text.endswith(f"verdict: DOES NOT FIT: over by {over} per device")
  assert over in ("2.000 GiB", "128.0 MiB", f"{(148.98 - 15.75):.3f} GiB")


def test_compiler_out_of_memory_without_sizes():
  memory = fit_check.out_of_memory_report("RESOURCE_EXHAUSTED: out of HBM", 16 * GIB)
  assert memory["total_bytes"] is None and not memory["fits"]
  assert fit_check.format_memory(memory).endswith(
      "verdict: DOES NOT FIT: the compiler ran out of HBM")


def test_hlo_flops_from_cost_analysis():
  def compiled(costs):
    return types.SimpleNamespace(cost_analysis=lambda: costs)
  assert fit_check.hlo_flops(compiled({"flops": 12.0, "bytes accessed": 3.0})) == 12.0
  assert fit_check.hlo_flops(compiled([{"flops": 7.0}])) == 7.0  # older jax: one per device
  assert fit_check.hlo_flops(compiled(None)) is None
  assert fit_check.hlo_flops(compiled({})) is None


def _fake_report(fits: bool) -> dict:
  hbm = 16 * GIB
  memory = fit_check.memory_report(
      _stats(GIB, GIB, (10 if fits else 20) * GIB, 0, GIB), hbm)
  return {"topology": "v5e:4x4", "device_kind": "TPU v5 lite", "num_devices": 16,
          "num_chips": 16,
          "mesh": "data=1 fsdp=16 tensor=1 context=1 (16 devices)",
          "mesh_shape": {"data": 1, "fsdp": 16, "tensor": 1, "context": 1},
          "vocab_size": 32768, "seq_len": 8192, "batch_size": 16, "grad_accum_steps": 2,
          "parameters": {"count": 956_368_896, "bytes": 3 * GIB, "state_bytes_per_device":
                         684 * MIB},
          "memory": memory, "lower_seconds": 1.6, "compile_seconds": 96.3,
          "mosaic_kernel_sites": 4, "hlo_flops_per_device": 2.126e12}


def test_format_report_lines():
  lines = fit_check.format_report(_fake_report(True)).splitlines()
  assert lines[0] == "topology: v5e:4x4 (16 chips; 16 devices of kind 'TPU v5 lite')"
  assert lines[1] == "mesh: data=1 fsdp=16 tensor=1 context=1 (16 devices)"
  assert lines[2] == "model: vocab 32768, seq_len 8192, global batch 16 (grad_accum_steps 2)"
  assert lines[3] == ("parameters: 956,368,896 (3.000 GiB); train state (params + optimizer) "
                      "684.0 MiB per device")
  assert "verdict: FITS: 5.000 GiB to spare per device" in lines
  assert ("lower 1.6 s, compile 96.3 s; 4 Pallas (Mosaic) kernel call sites in the step"
          in lines)
  assert lines[-1].startswith("HLO FLOPs per device per step")
  assert lines[-1].endswith(": 2.126e+12 (a while loop's body counted once; Pallas kernels "
                            "not counted)")


@pytest.mark.parametrize("fits, code", [(True, 0), (False, 1)])
def test_run_prints_writes_json_and_exits_by_verdict(fits, code, tmp_path, monkeypatch, capsys):
  report = _fake_report(fits)
  monkeypatch.setattr(fit_check, "check", lambda topology, hbm_gib=None, stage=None: report)
  out = tmp_path / "report.json"
  args = fit_check.argument_parser().parse_args(
      [f"--gin_file={QUICKSTART}", "--topology=v5e:4x4", f"--out={out}"])
  assert fit_check._run(args) == code
  assert ("verdict: FITS" if fits else "verdict: DOES NOT FIT") in capsys.readouterr().out
  assert json.loads(out.read_text()) == report


# ---------------------------------------------------------------- a real compile (libtpu)


def _quickstart_param_count() -> int:
  train_main.parse_gin([QUICKSTART], [])
  model = nnx.eval_shape(lambda: DecoderLM(vocab_size=256, rngs=nnx.Rngs(0)))
  return sum(math.prod(v.get_value().shape)
             for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@requires_libtpu
def test_quickstart_compiles_for_v5e_2x2(tmp_path):
  out = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items()
         if k not in ("TPU_LIBRARY_PATH", fit_check._CHILD_ENV)}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.fit_check", f"--gin_file={QUICKSTART}",
       "--topology=v5e:2x2", f"--out={out}"],
      env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert proc.stdout.strip().endswith(fit_check.format_report(report))
  assert report["num_devices"] == 4 and "v5" in report["device_kind"].lower()
  assert report["mesh_shape"] == {"data": 4, "fsdp": 1, "tensor": 1, "context": 1}
  assert (report["vocab_size"], report["seq_len"], report["batch_size"]) == (256, 64, 64)
  params = report["parameters"]
  assert params["count"] == _quickstart_param_count()
  assert params["bytes"] == 4 * params["count"]  # float32 parameters
  # Data parallel: every device holds the whole state (params, Adam's two moments, counts).
  assert 3 * params["bytes"] <= params["state_bytes_per_device"] <= 3 * params["bytes"] + 1024
  memory = report["memory"]
  assert memory["fits"] and memory["hbm_bytes"] == 16 * GIB
  assert memory["argument_bytes"] >= params["state_bytes_per_device"]  # + batch, TPU padding
  assert memory["total_bytes"] == (memory["argument_bytes"] + memory["output_bytes"] +
                                   memory["temp_bytes"] + memory["generated_code_bytes"] -
                                   memory["alias_bytes"])
  assert memory["alias_bytes"] > 0  # the donated state is updated in place
  assert report["mosaic_kernel_sites"] > 0  # the flash-attention kernels went through Mosaic
  # One device's step: 6 x params x its 16 x 64 tokens, plus some elementwise work (the
  # attention inside the Mosaic kernels is not counted by XLA).
  six_n_t = 6 * params["count"] * 16 * 64
  assert 1.0 <= report["hlo_flops_per_device"] / six_n_t <= 1.5


def test_settings_of_a_length_stage():
  train_main.parse_gin(["configs/experiments/quickstart.gin"], [
      "train.total_steps = 10", "train.batch_size = 16",
      "train.length_stages = [{'steps': 6, 'seq_len': 32}, "
      "{'steps': 4, 'seq_len': 128, 'rope_theta': 5e5}]"])
  last = fit_check.train_settings()
  assert (last.stage, last.batch_size, last.seq_len) == (1, 4, 128)
  assert last.position_overrides == {"rope_theta": 5e5}
  first = fit_check.train_settings(0)
  assert (first.stage, first.batch_size, first.seq_len) == (0, 16, 32)
  with pytest.raises(fit_check.FitCheckError, match="stages 0 ... 1"):
    fit_check.train_settings(2)
