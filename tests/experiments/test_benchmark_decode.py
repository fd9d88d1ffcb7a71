"""experiments.benchmark_decode at tiny lengths: the JSON rows, the markdown table and the
plot; the full-attention cache grows linearly with the length (about doubling) while the
sliding-window and recurrent caches stay the same; --max_timed_length times the growing
cache only up to the cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import benchmark_decode
from lclm.gin_config import REPO_ROOT


@pytest.mark.slow  # 25-45 s on 2 cores; the recurrent-cache accounting tests stay fast.
def test_smoke_run(tmp_path, capsys):
  out = tmp_path / "decode.json"
  argv = ["--lengths", "64,128", "--configs", "attention,local_attention", "--steps", "4",
          "--prefill_chunk_size", "32", "--max_timed_length", "64", "--out", str(out)]
  assert benchmark_decode.main(argv) == 0
  result = json.loads(out.read_text())
  assert result["metadata"]["command"].endswith(" ".join(argv))
  assert result["metadata"]["jax_version"] and result["settings"]["window"] == 64
  rows = {(r["config"], r["length"]): r for r in result["rows"]}
  assert len(rows) == 4
  small, large = rows["attention", 64], rows["attention", 128]
  # Full attention: 2 layers x (keys + values: 64 features x 4 bytes, + 2 int32 slot
  # indices) per token, for the 64 extra tokens; the rest (short conv inputs) is fixed.
  assert large["cache_bytes"] - small["cache_bytes"] == 64 * 2 * (2 * 64 * 4 + 8)
  assert 1.9 < large["cache_bytes"] / small["cache_bytes"] < 2.0
  assert small["cache_grows"] and large["decode_tokens_per_second"] is None  # above the cap
  assert small["decode_tokens_per_second"] > 0 and small["prefill_tokens_per_second"] > 0
  a, b = rows["local_attention", 64], rows["local_attention", 128]
  assert a["cache_bytes"] == b["cache_bytes"] < small["cache_bytes"] and not a["cache_grows"]
  assert a["decode_tokens_per_second"] > 0 and b["decode_tokens_per_second"] > 0
  table = (tmp_path / "decode.md").read_text()
  assert "| decode tokens/s | 64 | 128 |" in table and "| attention | " in table
  assert "not timed above 64 tokens" in table
  assert "| decode cache per sequence | 64 | 128 |" in capsys.readouterr().out
  assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["mamba", "mamba2", "lightning", "s4d", "jamba"])
def test_recurrent_caches(name):
  """Recurrent states stay the same at any length (computed abstractly); a hybrid with one
  attention layer grows by that layer's keys and values only."""
  model = benchmark_decode.build_model(name, window=32)
  sizes = [benchmark_decode.cache_bytes(model, 2, n) for n in (64, 128, 1 << 20)]
  if name == "jamba":
    assert sizes[1] - sizes[0] == 64 * (2 * 64 * 4 + 8)
  else:
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_landmark_cache_keeps_every_key():
  """Landmark Attention keeps each token's key and value and a landmark key per block."""
  model = benchmark_decode.build_model("landmark_attention", window=64)
  mixer = model.layer_blocks()[0].mixer
  assert (mixer.block_size, mixer.top_k) == (4, 15)
  small, large = (benchmark_decode.cache_bytes(model, 2, n) for n in (64, 128))
  assert large - small == 2 * 64 * (2 * 64 * 4) + 2 * (64 // 4) * 64 * 4



def test_infllm_stream_config_prefills_through_retrieval():
  """InfLLM as its paper runs: chunked prefill through retrieval, memory at the window's
  distance (tests/layers/test_kv_block_retrieval.py checks the rule)."""
  model = benchmark_decode.build_model("attention_infllm_stream", window=64)
  policy = model.layer_blocks()[0].mixer.cache_policy
  assert (policy.budget, policy.block_size, policy.window) == (64, 4, 16)
  assert (policy.prefill, policy.memory_distance) == ("retrieval", 16)


def test_razor_config_adds_two_sums_per_streaming_head():
  """RazorAttention's cache per sequence is DuoAttention's plus the float32 key and value
  sums of each streaming key/value head (2 of 4 per layer), whatever the length."""
  duo, razor = (benchmark_decode.build_model(n, window=32)
                for n in ("duo_attention", "razor_attention"))
  mixers = [block.mixer for block in razor.layer_blocks()]
  assert all(m.compensation_token for m in mixers)
  for length in (64, 1 << 16):
    extra = (benchmark_decode.cache_bytes(razor, 2, length)
             - benchmark_decode.cache_bytes(duo, 2, length))
    assert extra == len(mixers) * 2 * 2 * mixers[0].head_dim * 4


def test_builds_models_without_the_data_stack():
  """The decode benchmark needs gin, flax and the model, not the data pipeline (grain, tfds,
  array_record) or the training loop, so a GPU machine with only jax, flax and a carried
  gin-config wheel runs it (blocked here by a meta-path finder). Only Landmark Attention,
  whose gin file binds the data transform, needs the data stack."""
  code = textwrap.dedent("""
      import sys
      BLOCKED = {"grain", "tensorflow", "tensorflow_datasets", "array_record", "tensorboardX",
                 "orbax"}
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
      sys.meta_path.insert(0, Block())
      from experiments import benchmark_decode
      for name in ("attention", "razor_attention", "attention_h2o", "attention_infllm",
                   "mamba2"):
        model = benchmark_decode.build_model(name, 64)
        assert benchmark_decode.cache_bytes(model, 1, 128) > 0
      assert "experiments.train" not in sys.modules and "lclm.data" not in sys.modules
      print("built")
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, text=True,
                        capture_output=True, timeout=300, check=False)
  assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-3000:]
