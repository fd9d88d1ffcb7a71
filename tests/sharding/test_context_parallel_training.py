"""Context parallelism in training, on 8 fake CPU devices: a tiny model trained with the
sequence split over make_mesh(data=2, context=4) reproduces the one-device loss curve, for
each strategy and load balance and with rows pre-permuted by the data pipeline; mixers and
sequence lengths context parallelism cannot run fail with clear errors before compiling."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lclm.data.pipeline import to_balanced_order
from lclm.sharding import context_parallel_plan, with_context_rules
from lclm.sharding.rules import DEFAULT_AXIS_RULES
from pallas_kernels.ring_attention import load_balance_permutation

TRAIN = """
import jax, numpy as np, optax
from flax import nnx
from lclm.data.pipeline import to_balanced_order
from lclm.model import DecoderLM
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training.step import init_train_state, make_train_step
assert jax.device_count() == 8

def factory(short_conv_size=4, num_kv_heads=2):
  # A global and a sliding-window layer, GQA, the short convolution in front of each mixer.
  return DecoderLM(64, 32, layer_pattern=["attention", "local_attention"],
                   shared_mixer_options={"num_heads": 4, "num_kv_heads": num_kv_heads},
                   mixer_options={"local_attention": {"window": 5}},
                   short_conv_size=short_conv_size, mlp_hidden_features=64,
                   tie_embeddings=False, rngs=nnx.Rngs(0))

tx = optax.adamw(1e-2)
rng = np.random.default_rng(0)
B, T = 4, 32
batches = []
for _ in range(4):
  tokens = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
  # Packed documents whose boundaries fall inside and across the 4 sequence shards.
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, 13:] = 2
  segment_ids[1, 27:] = 3
  positions = np.concatenate([np.arange(13), np.arange(T - 13)])
  positions = np.tile(positions, (B, 1))
  positions[1, 27:] = np.arange(T - 27)
  batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                  "loss_mask": (rng.random((B, T)) < 0.8).astype(np.float32),
                  "segment_ids": segment_ids, "position_ids": positions.astype(np.int32)})

def train(mesh, context_parallel=None, balanced_rows=None, **model):
  state, shardings = init_train_state(lambda: factory(**model), tx, mesh,
                                      context_parallel=context_parallel)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh), context_parallel=context_parallel)
  curves = []
  for batch in batches:
    if balanced_rows is not None:  # What make_train_iterator(balanced_order=...) emits.
      batch = to_balanced_order(batch, load_balance=balanced_rows, num_shards=4)
    batch = shard_batch(batch, mesh)
    state, metrics = step(state, batch)
    curves.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  text = step.lower(state, batch).as_text()
  return np.asarray(curves), text, batch

def compare(name, settings, reference, balanced_rows=None, **model):
  mesh = make_mesh(data=2, context=4)
  curves, text, batch = train(mesh, settings, balanced_rows, **model)
  # The rows really are split along the sequence, and the attention moves K/V (ring) or
  # gathers them (all_gather) or swaps sequence for heads (ulysses) between the shards.
  assert batch["inputs"].sharding.shard_shape((B, T)) == (B // 2, T // 4), name
  collective = {"ring": "collective_permute", "all_gather": "all_gather",
                "ulysses": "all_to_all"}[settings["strategy"]]
  assert collective in text, name
  np.testing.assert_allclose(curves, reference, rtol=1e-5, err_msg=name)
  print("ok", name, np.max(np.abs(curves / reference - 1)), flush=True)

reference, _, _ = train(make_mesh(devices=jax.devices()[:1]))
assert reference[-1, 0] < reference[0, 0] - 0.05, reference  # The curve moves.
"""


def test_context_parallel_training_matches_one_device(fake_devices):
  """Ring attention with zigzag load balance (the configs/mesh/context4.gin choice)."""
  out = fake_devices(TRAIN + """
compare("ring zigzag", dict(strategy="ring", load_balance="zigzag"), reference)
""")
  assert out.count("ok ") == 1, out


@pytest.mark.slow
def test_every_strategy_and_pre_permuted_rows_match_one_device(fake_devices):
  out = fake_devices(TRAIN + """
for strategy, lb in [("ring", None), ("ring", "striped"), ("all_gather", None),
                     ("all_gather", "zigzag")]:
  compare(f"{strategy} {lb}", dict(strategy=strategy, load_balance=lb), reference)
# Ulysses needs heads and kv heads divisible by the context size.
mha, _, _ = train(make_mesh(devices=jax.devices()[:1]), num_kv_heads=4)
for lb in (None, "zigzag"):
  compare(f"ulysses {lb}", dict(strategy="ulysses", load_balance=lb), mha, num_kv_heads=4)
# Rows pre-permuted by the pipeline: an order-free model (no short convolution).
plain, _, _ = train(make_mesh(devices=jax.devices()[:1]), short_conv_size=0)
for strategy, lb in [("ring", "zigzag"), ("ring", "striped"), ("all_gather", "zigzag")]:
  compare(f"{strategy} {lb} pre-permuted",
          dict(strategy=strategy, load_balance=lb, token_order="balanced"), plain,
          balanced_rows=lb, short_conv_size=0)
""")
  assert out.count("ok ") == 9, out


def test_configuration_errors_before_compiling(fake_devices):
  """Everything here fails while tracing (init or the first step), before XLA compiles."""
  out = fake_devices("""
import jax, numpy as np, optax, pytest
from flax import nnx
from lclm.model import DecoderLM
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training.step import init_train_state, make_train_step
mesh = make_mesh(data=2, context=4)
tx = optax.sgd(1e-2)

def init(pattern=("attention",), cp=None, **options):
  options = {"num_heads": 4, **options}
  factory = lambda: DecoderLM(32, 16, layer_pattern=list(pattern),
                              shared_mixer_options=options, rngs=nnx.Rngs(0))
  return init_train_state(factory, tx, mesh, context_parallel=cp)

ring = dict(strategy="ring", load_balance="zigzag")
# Masks tied to heads or to absolute positions: refused when the model is built.
with pytest.raises(ValueError, match=r"layer 0 .*\\['mask'\\] cannot run with context "
                                     r"parallelism \\(ring attention, zigzag load balance"):
  init(cp=ring, per_head_windows=[None, 4, 4, None])
with pytest.raises(ValueError, match=r"\\['num_sink_tokens'\\] cannot run with context"):
  init(("local_attention",), cp=ring, window=4, num_sink_tokens=2)
with pytest.raises(ValueError, match="shifted_sparse_group_size"):
  init(cp=ring, shifted_sparse_group_size=4)
with pytest.raises(ValueError, match=r"num_kv_heads \\(2\\) must both be divisible by 4"):
  init(cp=dict(strategy="ulysses"), num_kv_heads=2)
# Ulysses under a tensor split: the heads left on a device must divide by the context size.
tensor_mesh = make_mesh(tensor=2, context=4)
def heads(n):
  return lambda: DecoderLM(32, 16, layer_pattern=["attention"], shared_mixer_options={
      "num_heads": n, "num_kv_heads": n}, rngs=nnx.Rngs(0))
with pytest.raises(ValueError, match=r"leaving 2 query and 2 kv heads per device, which the "
                                     r"4 context shards"):
  init_train_state(heads(4), tx, tensor_mesh, context_parallel=dict(strategy="ulysses"))
init_train_state(heads(8), tx, tensor_mesh, context_parallel=dict(strategy="ulysses"))
with pytest.raises(ValueError, match="strategy must be one of"):
  init(cp=dict(strategy="tree"))
with pytest.raises(ValueError, match="supports load_balance None or 'zigzag'"):
  init(cp=dict(strategy="all_gather", load_balance="striped"))
with pytest.raises(ValueError, match="short convolution"):
  factory = lambda: DecoderLM(32, 16, layer_pattern=["attention"], short_conv_size=3,
                              shared_mixer_options={"num_heads": 4}, rngs=nnx.Rngs(0))
  init_train_state(factory, tx, mesh, context_parallel=dict(
      strategy="ring", load_balance="zigzag", token_order="balanced"))
# The same model on one context shard builds: the checks apply only when context > 1.
one = make_mesh(data=8)
init_train_state(lambda: DecoderLM(32, 16, layer_pattern=["attention"], shared_mixer_options={
    "num_heads": 4, "per_head_windows": [None, 4, 4, None]}, rngs=nnx.Rngs(0)), tx, one,
    context_parallel=ring)

# A sequence length the zigzag layout cannot split: the step says so when it is traced.
state, shardings = init(cp=ring)
step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                       batch_sharding=batch_sharding(mesh), context_parallel=ring)
batch = {k: np.zeros((2, 36), np.float32 if k == "loss_mask" else np.int32)
         for k in ("inputs", "targets", "loss_mask", "segment_ids", "position_ids")}
with pytest.raises(ValueError, match=r"sequence length 36 must be divisible by 2 x the size "
                                     r"of axis 'context' \\(8.*change the task's seq_len"):
  step.trace(state, batch)
print("ok")
""")
  assert out.strip() == "ok", out


def test_rules_split_the_sequence_over_context_only_when_it_is_larger_than_one():
  from jax.sharding import AbstractMesh

  big = AbstractMesh((2, 1, 1, 4), ("data", "fsdp", "tensor", "context"))
  small = AbstractMesh((8, 1, 1, 1), ("data", "fsdp", "tensor", "context"))
  assert dict(with_context_rules(DEFAULT_AXIS_RULES, big))["length"] == "context"
  assert with_context_rules(DEFAULT_AXIS_RULES, small) == DEFAULT_AXIS_RULES
  custom = (("batch", "data"), ("length", "fsdp"))
  assert with_context_rules(custom, big) == custom  # An explicit choice stays.
  from lclm.sharding import batch_spec
  assert batch_spec(big) == P(("data", "fsdp"), "context")
  assert batch_spec(small) == P(("data", "fsdp"), None)
  assert context_parallel_plan(small, dict(strategy="ring")) is None
  plan = context_parallel_plan(big, dict(strategy="all_gather", load_balance="zigzag"))
  assert (plan.axis_name, plan.num_shards, plan.strategy) == ("context", 4, "all_gather")


def test_context4_gin_file():
  import os

  import gin
  from jax.sharding import AbstractMesh

  from lclm.sharding import context_parallelism

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  gin.parse_config_file(os.path.join(root, "configs", "mesh", "context4.gin"))
  assert context_parallelism() == dict(strategy="ring", load_balance="zigzag",
                                       token_order="natural")
  assert gin.query_parameter("make_mesh.context") == 4
  plan = context_parallel_plan(AbstractMesh((2, 1, 1, 4), ("data", "fsdp", "tensor",
                                                          "context")))
  assert (plan.strategy, plan.load_balance, plan.num_shards) == ("ring", "zigzag", 4)


def test_pipeline_emits_rows_in_the_balanced_order():
  rng = np.random.default_rng(1)
  batch = {"inputs": rng.integers(0, 9, (3, 16)), "position_ids": np.tile(np.arange(16), (3, 1))}
  for lb, devices in (("zigzag", 4), ("striped", 4), ("zigzag", 2)):
    out = to_balanced_order(batch, load_balance=lb, num_shards=devices)
    perm = load_balance_permutation(16, devices, lb)
    np.testing.assert_array_equal(out["position_ids"][0], perm)
    np.testing.assert_array_equal(out["inputs"][:, np.argsort(perm)], batch["inputs"])
  # Zigzag on 4 shards: shard p holds chunks p and 7 - p of 2 tokens.
  np.testing.assert_array_equal(
      to_balanced_order(batch, load_balance="zigzag", num_shards=4)["position_ids"][0, :4],
      [0, 1, 14, 15])
  with pytest.raises(ValueError, match="divisible by 8"):
    to_balanced_order({"inputs": np.zeros((1, 12))}, load_balance="zigzag", num_shards=4)

  # The pipeline option: every array of every batch, positions included, permuted alike.
  from lclm.data.pipeline import make_batch_iterator

  source = [{"inputs": rng.integers(0, 9, (2, 16)), "targets": rng.integers(0, 9, (2, 16)),
             "loss_mask": np.ones((2, 16))} for _ in range(2)]
  natural = next(make_batch_iterator(source))
  balanced = next(make_batch_iterator(source, balanced_order=("striped", 4)))
  perm = load_balance_permutation(16, 4, "striped")
  for name in natural:
    np.testing.assert_array_equal(balanced[name], natural[name][:, perm], err_msg=name)
  with pytest.raises(ValueError, match="balanced_order must be a pair"):
    make_batch_iterator(source, balanced_order="zigzag")
