"""Per-head masks (S²-Attn, DuoAttention windows with RazorAttention's compensation token)
under the sharded train step: each shard of the heads attends with its own heads' masks,
and training matches one device."""

PER_HEAD_SHARDS = """
import jax, numpy as np, optax
from flax import nnx
from lclm.model import DecoderLM
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training.step import init_train_state, make_train_step

def factory():
  return DecoderLM(64, 32, layer_pattern=["attention", "attention"],
                   mixer_options={"attention": {"num_heads": 4, "num_kv_heads": 4}},
                   layer_options={0: {"shifted_sparse_group_size": 4},
                                  1: {"per_head_windows": [None, 2, 5, 3], "num_sink_tokens": 1,
                                      "compensation_token": True}},
                   mlp_hidden_features=32, rngs=nnx.Rngs(0))

tx = optax.adamw(1e-2)
rng = np.random.default_rng(0)
B, T = 4, 16
tokens = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "loss_mask": np.ones((B, T), np.float32),
         "segment_ids": np.ones((B, T), np.int32),
         "position_ids": np.tile(np.arange(T), (B, 1)).astype(np.int32)}

def run(mesh):
  state, shardings = init_train_state(factory, tx, mesh)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh))
  sharded = shard_batch(batch, mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, sharded)
    losses.append(float(metrics["loss"]))
  return np.asarray(losses)

want = run(make_mesh(devices=jax.devices()[:1]))
# One kv head per shard: the shards' masks differ (plain/shifted groups, four windows; the
# compensation token's prefix sums run on the global arrays, segment_ids included).
got = run(make_mesh(data=2, tensor=4))
np.testing.assert_allclose(got, want, rtol=1e-5)
print("ok")
"""


def test_per_head_masks_under_head_sharding(fake_devices):
  out = fake_devices(PER_HEAD_SHARDS)
  assert out.count("ok") == 1, out
