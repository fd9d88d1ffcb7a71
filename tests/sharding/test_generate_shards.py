"""Generation with the model sharded over a mesh (data x tensor): the caches split like the
training activations and the kernels run per shard; tokens and logits equal one device (the
window layer with RazorAttention's compensation token: its ring's running sums too)."""

GENERATE_SHARDED = """
import jax, numpy as np, optax
from flax import nnx
from lclm.inference import generate
from lclm.model import DecoderLM
from lclm.sharding import make_mesh
from lclm.training.step import init_train_state

def factory():
  return DecoderLM(64, 32, layer_pattern=["local_attention", "attention", "mamba2"],
                   shared_mixer_options={"num_heads": 4, "num_kv_heads": 2},
                   mixer_options={"local_attention": {"window": 4, "num_sink_tokens": 1,
                                                      "compensation_token": True},
                                  "mamba2": {"head_dim": 16, "d_state": 8}},
                   mlp_hidden_features=32, short_conv_size=3, rngs=nnx.Rngs(0))

prompts = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
lengths = np.array([9, 2, 5, 7], np.int32)

def run(mesh):
  state, _ = init_train_state(factory, optax.sgd(0.1), mesh)
  return generate(state.model(), prompts, max_new_tokens=6, prompt_lengths=lengths,
                  prefill_chunk_size=4, return_logits=True, mesh=mesh)

want_tokens, want_logits = run(make_mesh(devices=jax.devices()[:1]))
mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
tokens, logits = run(mesh)
np.testing.assert_array_equal(tokens, want_tokens)
np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=1e-5)
print("ok")
"""


def test_generation_under_a_data_and_tensor_mesh(fake_devices):
  out = fake_devices(GENERATE_SHARDED)
  assert out.count("ok") == 1, out
