"""Compiled memory of the train step by rematerialisation policy, scanned or not.

    python -m experiments.bench_remat [--layers 32 --seq_len 4096 --features 1024 ...]

Builds the full train step (:func:`lclm.training.step.make_train_step`: forward, backward,
AdamW update) of an attention DecoderLM abstractly (no parameters are allocated), compiles
it for this machine's first device and prints, per ``remat_policy``, what
``compiled.memory_analysis()`` says: temporaries (the activations kept for the backward
live here), arguments (parameters, optimizer state, batch) and the peak (arguments +
outputs + temporaries - aliased bytes), the ratio of the peak to the ``"none"`` policy's,
the lowered program's size (HLO lines) and the compile time. Nothing runs, so the default
size (32 layers x 4K tokens, 1024 features: about 0.5 B parameters) compiles on a CPU
machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import benchmarking
from lclm import sharding
from lclm.model import DecoderLM, layer_stack
from lclm.sharding.partition import named_shardings
from lclm.training import optimizer, step

GIB = 2 ** 30


def lowered_train_step(*, layers: int, seq_len: int, features: int, heads: int, vocab: int,
                       batch: int, scan: bool, policy: str, dtype: str,
                       loss_chunk_size: int | None):
  """The lowered train step of ``layers`` attention layers on one device."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.axis_rules()
  tx = optimizer.make_optimizer(1000)

  def model_factory():
    return DecoderLM(vocab, features, layer_pattern=["attention"], num_periods=layers,
                     scan_layers=scan, remat_policy=policy,
                     shared_mixer_options={"num_heads": heads}, dtype=dtype,
                     rngs=nnx.Rngs(0))

  state = jax.eval_shape(lambda: step.init_train_state(model_factory, tx, mesh, rules)[0])
  train_step = step.make_train_step(
      tx, mesh=mesh, state_shardings=named_shardings(state, mesh, rules),
      batch_sharding=sharding.batch_sharding(mesh, rules), loss_chunk_size=loss_chunk_size)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  batch_shapes = {"inputs": tokens, "targets": tokens, "segment_ids": tokens,
                  "position_ids": tokens,
                  "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}
  return train_step.lower(state, batch_shapes)


def measure(policy: str, scan: bool, **sizes) -> dict:
  start = time.perf_counter()
  lowered = lowered_train_step(scan=scan, policy=policy, **sizes)
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  return {"remat_policy": policy, "scan_layers": scan,
          "hlo_lines": len(lowered.as_text().splitlines()),
          "lower_seconds": round(lower_seconds, 2), "compile_seconds": round(compile_seconds, 2),
          "temp_bytes": int(stats.temp_size_in_bytes),
          "argument_bytes": int(stats.argument_size_in_bytes),
          "peak_bytes": benchmarking.compiled_memory_bytes(compiled)}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--features", type=int, default=1024)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--policies", default="none,full,dots,minimal",
                      help=f"comma-separated, from {layer_stack.REMAT_POLICIES}")
  parser.add_argument("--scan", choices=("yes", "no", "both"), default="yes")
  parser.add_argument("--loss_chunk_size", type=int, default=None,
                      help="chunked cross-entropy (default: full logits)")
  parser.add_argument("--json", default=None, help="write the rows to this file")
  args = parser.parse_args(argv)
  policies = args.policies.split(",")
  for policy in policies:
    layer_stack.check_remat_policy(policy)
  scans = {"yes": [True], "no": [False], "both": [True, False]}[args.scan]
  sizes = dict(layers=args.layers, seq_len=args.seq_len, features=args.features,
               heads=args.heads, vocab=args.vocab, batch=args.batch, dtype=args.dtype,
               loss_chunk_size=args.loss_chunk_size)
  print(f"train step, {args.layers} attention layers x {args.seq_len} tokens x batch "
        f"{args.batch}, {args.features} features, vocab {args.vocab}, {args.dtype} compute, "
        f"on {jax.devices()[0].device_kind} (compile only)", flush=True)
  rows = []
  for scan in scans:
    for policy in policies:
      rows.append(measure(policy, scan, **sizes))
      print(f"  compiled scan={scan} remat={policy}", flush=True)
  print(f"{'scan':>5} {'remat':>8} {'temp GiB':>9} {'args GiB':>9} {'peak GiB':>9} "
        f"{'peak/none':>9} {'HLO lines':>9} {'compile s':>9}")
  for row in rows:
    base = next((r for r in rows if r["scan_layers"] == row["scan_layers"]
                 and r["remat_policy"] == "none"), None)
    ratio = f"{row['peak_bytes'] / base['peak_bytes']:.3f}" if base else "-"
    print(f"{str(row['scan_layers']):>5} {row['remat_policy']:>8} "
          f"{row['temp_bytes'] / GIB:9.2f} {row['argument_bytes'] / GIB:9.2f} "
          f"{row['peak_bytes'] / GIB:9.2f} {ratio:>9} {row['hlo_lines']:9d} "
          f"{row['compile_seconds']:9.1f}")
  if args.json:
    command = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["python -m experiments.bench_remat", *command]),
              "sizes": sizes, "environment": benchmarking.describe_environment(),
              "rows": rows}  # provenance read before the (tracked) file is rewritten
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
