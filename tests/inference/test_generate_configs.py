"""Every layer pattern of configs/mixers/ generates what one full forward pass predicts:
greedy generation with chunked prefill, rows of different prompt lengths, windows (8
tokens) shorter than the rows so the ring buffers wrap."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import train as train_main
from lclm.inference import generate
from lclm.model import DecoderLM

CONFIGS = sorted(f[:-4] for f in os.listdir(os.path.join(train_main.REPO_ROOT, "configs/mixers"))
                 if f.endswith(".gin"))
# Small windows (sequences of ~30 tokens wrap them) and a small model.
BINDINGS = ["LOCAL_WINDOW = 8", "STREAMING_WINDOW = 8", "S2_GROUP_SIZE = 8",
            "LANDMARK_VOCAB_SIZE = 64", "LANDMARK_ID = 63",  # landmark.gin's data transform
            "DecoderLM.features = 32", "DecoderLM.mlp_hidden_features = 32"]
PROMPTS = np.random.default_rng(0).integers(0, 64, size=(2, 21)).astype(np.int32)
LENGTHS = np.array([21, 13], np.int32)
NEW = 10


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_generates_what_the_full_pass_predicts(name):
  files = ["configs/model/tiny.gin", f"configs/mixers/{name}.gin"]
  with open(os.path.join(train_main.REPO_ROOT, files[-1])) as f:
    text = f.read()
  train_main.parse_gin(files, [b for b in BINDINGS
                               if b.startswith("DecoderLM") or b.split(" ")[0] in text])
  model = DecoderLM(64, rngs=nnx.Rngs(0))
  model.eval()
  tokens, logits = generate(model, PROMPTS, max_new_tokens=NEW, prompt_lengths=LENGTHS,
                            prefill_chunk_size=8, return_logits=True)
  for b, length in enumerate(LENGTHS):
    seq = np.concatenate([PROMPTS[b, :length], np.asarray(tokens[b])])[None]
    full = model(jnp.asarray(seq), position_ids=jnp.arange(seq.shape[1])[None])
    np.testing.assert_allclose(logits[b], full[0, length - 1:length - 1 + NEW], atol=2e-4,
                               rtol=1e-4, err_msg=f"{name}, row {b}")
