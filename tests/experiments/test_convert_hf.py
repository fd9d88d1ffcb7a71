"""experiments.convert_hf: Hugging Face folder -> lclm run directory -> Hugging Face folder."""

from __future__ import annotations

import json
import os

import gin
import numpy as np
import pytest
from flax import nnx

import lclm.hf
from experiments import convert_hf
from lclm.model import DecoderLM

OPTIONS = dict(vocab_size=53, features=16, layer_pattern=["attention", "attention"],
               shared_mixer_options={"num_heads": 2, "qkv_bias": True},
               position_options={"rope_theta": 500.0, "max_position_embeddings": 64},
               mlp_hidden_features=24)


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()  # --to_hf parses the run's config; later tests must not inherit it.


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen2"))
  lclm.hf.save_pretrained(DecoderLM(**OPTIONS, rngs=nnx.Rngs(3)), folder, architecture="qwen2")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": None, "eos_token": "<eos>"}, f)
  return folder


def test_round_trip_keeps_every_tensor(hf_folder, tmp_path, capsys):
  workdir, back = str(tmp_path / "run"), str(tmp_path / "back")
  assert convert_hf.main([f"--hf_dir={hf_folder}", f"--workdir={workdir}"]) == 0
  assert "converted qwen2" in capsys.readouterr().out
  for name in ("model.gin", "config.gin", "hf_config.json", "checkpoints",
               "tokenizer/tokenizer_config.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "model.gin")) as f:
    assert "HF_VOCAB_SIZE = 53" in f.read()
  assert convert_hf.main(["--to_hf", f"--workdir={workdir}", f"--hf_dir={back}",
                          "--architecture=qwen2"]) == 0
  assert os.path.exists(os.path.join(back, "tokenizer_config.json"))
  original = lclm.hf.files.TensorReader(hf_folder)
  restored = lclm.hf.files.TensorReader(back)
  assert sorted(original) == sorted(restored)
  for name in original:
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(original[name]),
                                  err_msg=name)


def test_errors_exit_2(hf_folder, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert convert_hf.main([f"--hf_dir={hf_folder}", f"--workdir={workdir}"]) == 0
  assert convert_hf.main([f"--hf_dir={hf_folder}", f"--workdir={workdir}"]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err
  assert convert_hf.main([f"--hf_dir={tmp_path / 'none'}", f"--workdir={tmp_path / 'x'}"]) == 2
  assert convert_hf.main(["--to_hf", f"--workdir={workdir}", f"--hf_dir={tmp_path / 'y'}"]) == 2
  assert convert_hf.main(["--to_hf", f"--workdir={workdir}", f"--hf_dir={tmp_path / 'y'}",
                          "--architecture=gemma2"]) == 2
  assert "architecture must be one of" in capsys.readouterr().err
