"""Memory and time of the full-logits loss vs the chunked cross-entropy (lclm.training.losses).

    python -m experiments.bench_cross_entropy [--vocab 131072 --seq 8192 --features 1024 ...]

Each program is forward + backward: the gradients of ``ce_sum + z_loss_sum`` with respect
to the hidden states [batch, seq, features] and the output weights [features, vocab].

* Large size (default 128K vocabulary x 8K tokens, features 1024, batch 1, bfloat16
  operands): compile only (``jax.jit(...).lower(...).compile()``, nothing runs), and
  ``compiled.memory_analysis()``: temporaries and peak (arguments + outputs +
  temporaries - aliases) of the full loss (the float32 [batch, seq, vocab] logits and their
  gradient) and of the chunked loss, and their ratio.
* Small size (default 8K vocabulary x 1K tokens, features 256): both programs run; median
  time after warm-up, the same memory figures, and the largest difference of the sums.

Prints a table and, with ``--json PATH``, writes the rows and the environment.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarking
from lclm.training import losses

MIB = 2 ** 20


def _objective(sums_fn):
  def objective(hidden, weights, targets, mask):
    sums = sums_fn(hidden, weights, targets, mask)
    return sums["ce_sum"] + sums["z_loss_sum"], sums
  return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)


def _programs(chunk_size: int, vocab_chunk_size: int | None, soft_cap: float | None):
  full = functools.partial(losses.reference_cross_entropy_sums, soft_cap=soft_cap)
  chunked = functools.partial(losses.chunked_cross_entropy_sums, soft_cap=soft_cap,
                              chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
  return {"full logits": _objective(full), "chunked": _objective(chunked)}


def _shapes(batch, seq, features, vocab, dtype):
  return (jax.ShapeDtypeStruct((batch, seq, features), dtype),
          jax.ShapeDtypeStruct((features, vocab), dtype),
          jax.ShapeDtypeStruct((batch, seq), jnp.int32),
          jax.ShapeDtypeStruct((batch, seq), jnp.float32))


def _inputs(batch, seq, features, vocab, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(keys[0], (batch, seq, features), jnp.float32).astype(dtype)
  weights = (jax.random.normal(keys[1], (features, vocab), jnp.float32)
             * features ** -0.5).astype(dtype)
  targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
  return hidden, weights, targets, jnp.ones((batch, seq), jnp.float32)


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {"temp_bytes": None, "peak_bytes": None}
  return {"temp_bytes": int(stats.temp_size_in_bytes),
          "peak_bytes": benchmarking.compiled_memory_bytes(compiled)}


def _mib(value) -> str:
  return "-" if value is None else f"{value / MIB:,.1f}"


def measure(size: str, *, batch, seq, features, vocab, dtype, chunk_size, vocab_chunk_size,
            soft_cap, run: bool, repeats: int) -> list[dict]:
  """One row per program at one size; ``run``: also time them and compare their sums."""
  rows, outputs = [], {}
  shapes = _shapes(batch, seq, features, vocab, dtype)
  inputs = _inputs(batch, seq, features, vocab, dtype) if run else None
  for name, program in _programs(chunk_size, vocab_chunk_size, soft_cap).items():
    compiled = benchmarking.compile_fn(program, *shapes)
    row = dict(size=size, program=name, batch=batch, seq=seq, features=features, vocab=vocab,
               dtype=jnp.dtype(dtype).name, chunk_size=chunk_size,
               vocab_chunk_size=vocab_chunk_size, **_memory(compiled), time_ms=None)
    if run:
      row["time_ms"] = 1e3 * benchmarking.time_fn(compiled, *inputs, repeats=repeats)
      outputs[name] = jax.device_get(compiled(*inputs)[0][1])
    rows.append(row)
  full, chunked = rows
  for key in ("temp_bytes", "peak_bytes"):
    if full[key] and chunked[key]:
      chunked[f"{key}_ratio_full_over_chunked"] = full[key] / chunked[key]
  if run:
    chunked["max_sum_rel_diff"] = max(
        float(abs(outputs["chunked"][k] - outputs["full logits"][k])
              / max(abs(outputs["full logits"][k]), 1e-30)) for k in losses.SUM_NAMES)
  return rows


def _print(rows: list[dict]) -> None:
  header = (f"{'size':6} {'program':12} {'B':>2} {'T':>6} {'F':>5} {'V':>7} {'dtype':9} "
            f"{'temp MiB':>10} {'peak MiB':>10} {'time ms':>9}  notes")
  print(header)
  print("-" * len(header))
  for row in rows:
    notes = []
    if "peak_bytes_ratio_full_over_chunked" in row:
      notes.append(f"full/chunked peak {row['peak_bytes_ratio_full_over_chunked']:.1f}x, temp "
                   f"{row['temp_bytes_ratio_full_over_chunked']:.1f}x")
    if "max_sum_rel_diff" in row:
      notes.append(f"sums rel diff {row['max_sum_rel_diff']:.1e}")
    if row["program"] == "chunked":
      notes.append(f"chunk {row['chunk_size']} x vocab tile {row['vocab_chunk_size'] or 'all'}")
    time_text = "-" if row["time_ms"] is None else f"{row['time_ms']:.2f}"
    print(f"{row['size']:6} {row['program']:12} {row['batch']:>2} {row['seq']:>6} "
          f"{row['features']:>5} {row['vocab']:>7} {row['dtype']:9} "
          f"{_mib(row['temp_bytes']):>10} {_mib(row['peak_bytes']):>10} {time_text:>9}  "
          f"{'; '.join(notes)}")


def _positive_or_none(text: str) -> int | None:
  if text.lower() == "none":
    return None
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive int or 'none', got {text!r}")
  return value


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=8192, help="tokens of the large size")
  parser.add_argument("--vocab", type=int, default=131072)
  parser.add_argument("--features", type=int, default=1024)
  parser.add_argument("--dtype", default="bfloat16", help="hidden and weights dtype")
  parser.add_argument("--chunk_size", type=int, default=1024)
  parser.add_argument("--vocab_chunk_size", type=_positive_or_none, default=None,
                      help="vocabulary tile of the chunked loss ('none': whole vocabulary)")
  parser.add_argument("--soft_cap", type=float, default=None)
  parser.add_argument("--small_seq", type=int, default=1024)
  parser.add_argument("--small_vocab", type=int, default=8192)
  parser.add_argument("--small_features", type=int, default=256)
  parser.add_argument("--small_chunk_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None, help="write the rows and environment here")
  args = parser.parse_args(argv)
  for name in ("batch", "seq", "vocab", "features", "chunk_size", "small_seq", "small_vocab",
               "small_features", "small_chunk_size", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
  dtype = jnp.dtype(args.dtype)

  rows = measure("large", batch=args.batch, seq=args.seq, features=args.features,
                 vocab=args.vocab, dtype=dtype, chunk_size=args.chunk_size,
                 vocab_chunk_size=args.vocab_chunk_size, soft_cap=args.soft_cap, run=False,
                 repeats=args.repeats)
  rows += measure("small", batch=args.batch, seq=args.small_seq, features=args.small_features,
                  vocab=args.small_vocab, dtype=dtype, chunk_size=args.small_chunk_size,
                  vocab_chunk_size=(None if args.vocab_chunk_size is None
                                    else min(args.vocab_chunk_size, args.small_vocab)),
                  soft_cap=args.soft_cap, run=True, repeats=args.repeats)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; "
        "forward + backward of ce_sum + z_loss_sum wrt hidden and weights")
  _print(rows)
  if args.json:
    environment = benchmarking.describe_environment()  # before the file is truncated
    with open(args.json, "w") as f:
      json.dump({"environment": environment, "rows": rows}, f,
                indent=2, default=str)
  return rows


if __name__ == "__main__":
  main()
