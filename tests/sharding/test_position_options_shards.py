"""Position options under the sharded train step (8 fake devices): per-head RoPE bases,
YaRN and the two-pass Self-Extend / LM-Infinite modes run per shard of batch and heads and
match one device."""

POSITION_SHARDS = """
import jax, numpy as np, optax
from flax import nnx
from lclm.model import DecoderLM
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training.step import init_train_state, make_train_step

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
LAYERS = {
    "self_extend": {"rope_theta": [1e2, 1e2, 1e4, 1e4], "rope_scaling": YARN,
                    "position_extension": {"method": "self_extend", "group_size": 2,
                                           "window": 4}},
    "lm_infinite": {"position_extension": {"method": "lm_infinite", "local_window": 4,
                                           "max_distance": 4, "num_global": 2}},
}

def factory(options):
  return DecoderLM(64, 32, layer_pattern=["attention"],
                   mixer_options={"attention": {"num_heads": 4, "num_kv_heads": 2,
                                                "implementation": "xla", **options}},
                   mlp_hidden_features=32, rngs=nnx.Rngs(0))

tx = optax.adamw(1e-2)
rng = np.random.default_rng(0)
B, T = 8, 24
tokens = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "loss_mask": np.ones((B, T), np.float32),
         "segment_ids": np.repeat(np.array([[1] * 15 + [2] * 9]), B, 0).astype(np.int32),
         "position_ids": np.tile(np.concatenate([np.arange(15), np.arange(9)]),
                                 (B, 1)).astype(np.int32)}

def run(mesh, options):
  state, shardings = init_train_state(lambda: factory(options), tx, mesh)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh))
  sharded = shard_batch(batch, mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, sharded)
    losses.append(float(metrics["loss"]))
  return np.asarray(losses)

for name, options in LAYERS.items():
  want = run(make_mesh(devices=jax.devices()[:1]), options)
  got = run(make_mesh(data=4, tensor=2), options)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  print("ok", name, want)
"""


def test_position_options_run_per_shard(fake_devices):
  out = fake_devices(POSITION_SHARDS)
  assert out.count("ok") == 2, out
