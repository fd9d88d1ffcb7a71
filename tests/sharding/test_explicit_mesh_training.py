"""On 4 fake CPU devices: a mesh from ``jax.make_mesh`` (Explicit axes) trains and restores
like lclm's Auto mesh: a batch the user placed on it, with its NamedSharding as the step's
batch sharding, runs the Auto mesh's program, and ``restore_params(mesh=...)`` places the
parameters in the Auto mesh's shardings."""

EXPLICIT_MESH = """
import tempfile
import jax, numpy as np, optax
from jax.sharding import AxisType, NamedSharding
from flax import nnx
from lclm.model import DecoderLM
from lclm.sharding import MESH_AXES, batch_sharding, batch_spec, make_mesh, shard_batch
from lclm.training import checkpointing
from lclm.training.restore import restore_params
from lclm.training.step import init_train_state, make_train_step

def factory(scan_layers=False):
  return DecoderLM(64, 32, layer_pattern=["attention"],
                   mixer_options={"attention": {"num_heads": 4, "num_kv_heads": 2}},
                   mlp_hidden_features=64, scan_layers=scan_layers, rngs=nnx.Rngs(0))

rng = np.random.default_rng(0)
B, T = 8, 16
tokens = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "loss_mask": (rng.random((B, T)) < 0.8).astype(np.float32),
         "segment_ids": np.zeros((B, T), np.int32),
         "position_ids": np.tile(np.arange(T), (B, 1)).astype(np.int32)}
tx = optax.sgd(0.5)
auto = make_mesh(data=4)
explicit = jax.make_mesh((4, 1, 1, 1), MESH_AXES, axis_types=(AxisType.Explicit,) * 4)
assert explicit.devices.tolist() == auto.devices.tolist()

state, shardings = init_train_state(factory, tx, explicit)
# The user's own placement on the Explicit mesh, and its NamedSharding as the batch sharding.
user = NamedSharding(explicit, batch_spec(explicit))
step = make_train_step(tx, mesh=explicit, state_shardings=shardings, batch_sharding=user)
placed = jax.device_put(batch, user)
# The same program as the Auto mesh's step (so the same values), from concrete arrays and
# from ShapeDtypeStructs placed on the Explicit mesh.
auto_step = make_train_step(tx, mesh=auto, state_shardings=shardings,
                            batch_sharding=batch_sharding(auto))
reference = auto_step.lower(state, shard_batch(batch, auto)).as_text()
abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=user) for k, v in batch.items()}
assert step.lower(state, placed).as_text() == reference
assert step.lower(state, abstract).as_text() == reference
before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
state, metrics = step(state, placed)
assert np.isfinite(float(metrics["loss"])) and metrics["loss"].sharding.mesh == auto
assert not all(np.array_equal(a, np.asarray(b))
               for a, b in zip(before, jax.tree.leaves(state.params)))
assert all(x.sharding.mesh == auto for x in jax.tree.leaves(state.params))

# restore_params on the Explicit mesh, into the scanned-layers model (the checkpoint's layers
# are stacked into shardings made there): the values and shardings of the Auto mesh's restore.
with tempfile.TemporaryDirectory() as workdir:
  checkpointing.save_params_checkpoint(workdir, nnx.merge(state.graphdef, state.params))
  restored = [jax.tree.leaves(nnx.state(restore_params(
      workdir, lambda: factory(scan_layers=True), mesh=mesh)[1], nnx.Param))
              for mesh in (explicit, auto)]
for a, b in zip(*restored):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.sharding == b.sharding
print("ok")
"""


def test_explicit_mesh_trains_and_restores_like_auto(fake_devices):
  assert fake_devices(EXPLICIT_MESH, num_devices=4).strip().endswith("ok")
