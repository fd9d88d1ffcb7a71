"""Model FLOPs of tiny DecoderLMs against hand counts, the MFU peak table, and every built-in
mixer's core_flops_per_token."""

from __future__ import annotations

import warnings

import pytest
from flax import nnx

import lclm.model.mixers_lightning  # noqa: F401  (registers the mixers)
import lclm.model.mixers_mamba  # noqa: F401
import lclm.model.mixers_mamba2  # noqa: F401
import lclm.model.mixers_s4d  # noqa: F401
import lclm.model.mixers_titans  # noqa: F401
from lclm.model import DecoderLM
from lclm.model.registry import register_mixer, unregister_mixer
from lclm.training import flops


def _model(vocab_size=64, features=32, **options):
  """An abstract model (shapes only, nothing computed): all that FLOP counts read."""
  return nnx.eval_shape(lambda: DecoderLM(vocab_size, features, rngs=nnx.Rngs(0), **options))


def test_tiny_attention_model_matches_a_hand_count():
  model = _model(layer_pattern=["attention"], mixer_options={"attention": {"num_heads": 2}},
                 mlp_hidden_features=48)
  got = flops.forward_flops_per_token(model, 16)
  # q, k, v, o: 4 x 32 x 32 multiply-adds; attention: 2 heads of 16, (16 + 1) / 2 keys on
  # average, 2 x 2 x 16 FLOPs per key and head; SwiGLU 32 -> 48 -> 32: 3 x 32 x 48; tied
  # output 32 x 64.
  want = {"matmul": 2 * 4 * 32 * 32, "attention": 4 * 2 * 16 * 8.5, "recurrent": 0.0,
          "conv": 0.0, "mlp": 2 * 3 * 32 * 48, "output": 2 * 32 * 64}
  assert got == pytest.approx({**want, "total": sum(want.values())})
  train = flops.model_flops_per_token(model, 16)
  assert train["total"] == pytest.approx(3 * got["total"])


@pytest.mark.parametrize("options, keys_per_query", [
    # A window of 3 keys (itself included) over 8 tokens: 1, 2, 3, 3, 3, 3, 3, 3.
    (dict(window=3), 21 / 8),
    # ... and 2 sinks: 1, 2, 3, then 3 + 1 (key 0) at position 3, 3 + 2 from position 4.
    (dict(window=3, num_sink_tokens=2), (1 + 2 + 3 + 4 + 5 * 4) / 8),
])
def test_sliding_window_counts_the_keys_each_query_sees(options, keys_per_query):
  model = _model(layer_pattern=["local_attention"],
                 mixer_options={"local_attention": {"num_heads": 2, **options}})
  core = model.blocks[0].mixer.core_flops_per_token(8)
  assert core == {"attention": pytest.approx(4 * 2 * 16 * keys_per_query)}


def test_per_head_windows_average_over_the_heads():
  model = _model(layer_pattern=["attention"],
                 mixer_options={"attention": {"num_heads": 2, "per_head_windows": [None, 2]}})
  # Head 0 full causal: 4.5 keys on average; head 1 a window of 2: (1 + 2 * 7) / 8.
  want = 4 * 16 * (4.5 + 15 / 8)
  assert model.blocks[0].mixer.core_flops_per_token(8)["attention"] == pytest.approx(want)


def test_tiny_mamba2_model_matches_a_hand_count():
  model = _model(vocab_size=32, features=16, layer_pattern=["mamba2"], mlp_pattern="none",
                 mixer_options={"mamba2": {"head_dim": 8, "d_state": 4, "chunk_size": 8}})
  got = flops.forward_flops_per_token(model, 16)
  # d_inner = 32, heads H = 4 of P = 8, N = 4, one group, chunk L = 8.
  in_proj = 16 * (2 * 32 + 2 * 4 + 4)  # z, x, B, C, dt
  out_proj = 32 * 16
  conv = 2 * 4 * (32 + 2 * 4)
  ssd = (1 * 4 + 4 * 8) * (8 + 1) + 4 * (4 * 8) * 4  # C Bᵀ and its product; states, read
  want = {"matmul": 2 * (in_proj + out_proj), "attention": 0.0, "recurrent": ssd,
          "conv": conv, "mlp": 0.0, "output": 2 * 16 * 32}
  assert got == pytest.approx({**want, "total": sum(want.values())})


def test_moe_counts_the_router_and_the_chosen_experts_only():
  model = _model(features=16, layer_pattern=["attention"], mlp_pattern="moe",
                 mixer_options={"attention": {"num_heads": 2}}, mlp_hidden_features=8,
                 moe_options={"num_experts": 4, "num_experts_per_token": 2})
  got = flops.forward_flops_per_token(model, 8)
  assert got["mlp"] == pytest.approx(2 * (16 * 4 + 2 * 3 * 16 * 8))


class _NoCount(nnx.Module):

  def __init__(self, features, *, rngs, dtype, param_dtype):
    self.proj = nnx.Linear(features, features, rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

  def __call__(self, x, *, position_ids=None, segment_ids=None):
    return self.proj(x)


def test_a_mixer_without_the_method_counts_zero_and_warns_once():
  register_mixer("_flops_test_mixer")(_NoCount)
  try:
    model = _model(layer_pattern=["_flops_test_mixer"] * 2, mlp_pattern="none")
    flops._WARNED.discard("_NoCount")
    with pytest.warns(UserWarning, match="_NoCount has no core_flops_per_token"):
      got = flops.forward_flops_per_token(model, 8)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      flops.forward_flops_per_token(model, 8)  # no second warning
  finally:
    unregister_mixer("_flops_test_mixer")
  assert got["matmul"] == 2 * 2 * 32 * 32 and got["recurrent"] == got["attention"] == 0


@pytest.mark.parametrize("name, options", [
    ("mamba", {}),
    ("lightning", {"num_heads": 2}),
    ("s4d", {"state_size": 8}),
    ("neural_memory", {"num_heads": 2}),
    ("titans_mac", {"num_heads": 2, "segment_size": 16}),
    ("titans_mag", {"num_heads": 2, "window": 8}),
    ("titans_mal", {"num_heads": 2, "window": 8}),
])
def test_every_builtin_mixer_reports_its_core(name, options):
  model = _model(layer_pattern=[name], mixer_options={name: options} if options else None)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    core = flops.mixer_core_flops(model.blocks[0].mixer, 32)
  assert core and all(v > 0 for v in core.values())
  with pytest.raises(ValueError, match="seq_len must be a positive int"):
    model.blocks[0].mixer.core_flops_per_token(0)


def test_hand_counts_of_the_recurrent_cores():
  lightning = _model(layer_pattern=["lightning"],
                     mixer_options={"lightning": {"num_heads": 2, "chunk_size": 4}})
  # 2 heads of 16: 2 x 16 x (4 + 1) intra-chunk, 4 x 16² state read and update.
  assert lightning.blocks[0].mixer.core_flops_per_token(32) == {
      "recurrent": 2 * (2 * 16 * 5 + 4 * 16 * 16)}
  s4d = _model(layer_pattern=["s4d"], mixer_options={"s4d": {"state_size": 8}})
  assert s4d.blocks[0].mixer.core_flops_per_token(32) == {"recurrent": 12 * 32 * 4 + 2 * 32}
  mamba = _model(features=16, layer_pattern=["mamba"],
                 mixer_options={"mamba": {"d_state": 4, "dt_rank": 2}})
  d = 32  # expand 2
  assert mamba.blocks[0].mixer.core_flops_per_token(32) == {
      "matmul": 2 * (16 * 2 * d + d * (2 + 8) + 2 * d + d * 16),
      "recurrent": 9 * d * 4 + 2 * d, "conv": 2 * 4 * d}


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None), ("Some new chip", None),
])
def test_peak_table(kind, peak):
  assert flops.peak_flops_per_device(kind) == peak


def test_mfu_is_none_without_a_known_peak():
  assert flops.mfu(6e9, 1e4, None) is None
  assert flops.mfu(6e9, 1e4, 989e12) == pytest.approx(6e13 / 989e12)


def test_bad_seq_len_is_refused():
  model = _model(layer_pattern=["attention"], mixer_options={"attention": {"num_heads": 2}})
  with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
    flops.forward_flops_per_token(model, 0)
