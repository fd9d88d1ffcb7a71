"""Decode cache size and decode speed against context length, per mixer and hybrid.

    python -m experiments.benchmark_decode [--lengths 1024,2048,...,65536] [--batch 1] \
        [--configs attention,mamba2,...] [--steps 64] [--prefill_chunk_size 1024] \
        [--max_timed_length 65536] [--out benchmarks/results/decode_cpu.json] \
        [--plot benchmarks/results/decode_cpu.png]

Every configuration is a tiny model (``configs/model/tiny.gin``: 64 features, a 4-wide
short convolution, vocabulary 256; 4 heads): each mixer alone in two layers (``attention``,
``local_attention``, ``mamba``, ``mamba2``, ``lightning``, ``s4d``) and the hybrid layer
patterns of ``configs/mixers/`` at their full depth (6 or 8 layers, or 2 for DuoAttention);
``attention_streaming_llm``, ``attention_h2o``, ``attention_h2o_merge`` and
``attention_snapkv`` are ``attention`` decoding with a KV-cache policy
(``layers/kv_policies.py``) whose budget is the window; ``attention_quest`` and
``attention_infllm`` keep the whole cache and read the window's worth of keys per step
(``layers/kv_retrieval.py``; at a 1024 budget: 64-key blocks, a 256-token local window, the
rest top-k blocks; ``{block}`` and ``{local}`` are the budget / 16 and / 4);
``attention_infllm_stream`` is InfLLM as its paper runs (``prefill="retrieval"``: each
prefill chunk reads the budget too, so prefill is linear in L; memory keys at the local
window's distance);
``landmark_attention`` is Landmark Attention's two layers (``configs/mixers/landmark.gin``,
``{block}``-token blocks, a step reads its own block and ``{top_k}`` = budget / block - 1
retrieved blocks; the prompt's random ids carry no landmarks, which only the speed
ignores). Sliding windows
(``local_attention``, the hybrids' ``LOCAL_WINDOW``, DuoAttention's ``STREAMING_WINDOW``) and
budgets are 1024 tokens, or the shortest length when that is shorter (the cache holds
``L + steps`` tokens, more than the window, so every window is a ring).

At each context length L:

* ``cache_bytes``: bytes per sequence of the whole decode cache (every leaf of
  ``model.init_cache(batch, L + steps)``: keys, values and their slot indices, recurrent
  states, the short convolutions' last inputs, lengths) / batch. Computed abstractly
  (``jax.eval_shape``), so it costs nothing at any length.
* ``decode_tokens_per_second``: a prompt of L random ids is prefilled in chunks of
  ``--prefill_chunk_size`` tokens, then ``--steps`` tokens are generated greedily with
  :func:`lclm.inference.generate` (cache of ``L + steps`` tokens); the speeds are those of
  that call (``lclm.inference.LAST_TIMES``), after a warm-up call with the same shapes
  (one prefill chunk) that compiles everything. ``prefill_tokens_per_second`` is recorded
  too. ``--max_timed_length`` caps the lengths timed for the configurations whose cache
  grows with the length (those with a full-attention layer; ``cache_grows`` in the rows):
  their prefill is quadratic (two attention layers at 32K tokens: 68 s on an idle 2-core
  CPU, 156 s on a loaded one), so above the cap their rows carry the cache size only.
  Window and recurrent configurations are timed at every length.

The table (markdown) is printed and written next to ``--out`` (``.md``); the JSON holds the
device, the jax version, the exact command and one row per configuration and length; the
plot has two panels (cache bytes against length, log-log; decode tokens/s against length).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings

import jax
import numpy as np

from experiments import benchmarking
from lclm.gin_config import parse_gin

TINY = "configs/model/tiny.gin"
VOCAB = 256
# Mixers alone (two layers each) and hybrids: name -> gin files after tiny.gin (+ bindings).
# {window}, {block} and {local} are filled in (build_model).
CONFIGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (("configs/mixers/attention.gin",), ()),
    "local_attention": (("configs/mixers/attention.gin",), (
        "LAYER_PATTERN = ['local_attention', 'local_attention']",
        "DecoderLM.mixer_options = {'local_attention': {'num_heads': 4, 'window': {window}}}")),
    # KV-cache policies (layers/kv_policies.py) on the full-attention layers, budget = window.
    "attention_streaming_llm": (("configs/mixers/attention.gin",), (
        "DecoderLM.mixer_options = {'attention': {'num_heads': 4, 'cache_policy': "
        "{'name': 'streaming_llm', 'budget': {window}}}}",)),
    "attention_h2o": (("configs/mixers/attention.gin",), (
        "DecoderLM.mixer_options = {'attention': {'num_heads': 4, 'cache_policy': "
        "{'name': 'h2o', 'budget': {window}}}}",)),
    "attention_h2o_merge": (("configs/mixers/attention.gin",), (
        "DecoderLM.mixer_options = {'attention': {'num_heads': 4, 'cache_policy': "
        "{'name': 'h2o', 'budget': {window}, 'merge': True}}}",)),
    "attention_snapkv": (("configs/mixers/attention.gin",), (
        "DecoderLM.mixer_options = {'attention': {'num_heads': 4, 'cache_policy': "
        "{'name': 'snapkv', 'budget': {window}}}}",)),
    # Block retrieval (layers/kv_retrieval.py): the whole cache stays, a step reads the budget.
    "attention_quest": (("configs/mixers/attention.gin",), (
        "DecoderLM.mixer_options = {'attention': {'num_heads': 4, 'cache_policy': "
        "{'name': 'quest', 'budget': {window}, 'block_size': {block}, 'window': {local}}}}",)),
    "attention_infllm": (("configs/mixers/attention.gin",), (
        "DecoderLM.mixer_options = {'attention': {'num_heads': 4, 'cache_policy': "
        "{'name': 'infllm', 'budget': {window}, 'block_size': {block}, 'window': {local}}}}",)),
    # InfLLM as its paper runs: chunked prefill through retrieval too (each prefill chunk
    # reads the budget), memory keys at the window's distance.
    "attention_infllm_stream": (("configs/mixers/attention.gin",), (
        "DecoderLM.mixer_options = {'attention': {'num_heads': 4, 'cache_policy': "
        "{'name': 'infllm', 'budget': {window}, 'block_size': {block}, 'window': {local}, "
        "'prefill': 'retrieval', 'memory_distance': {local}}}}",)),
    # Landmark Attention (layers/landmark_attention.py): every key stays; a decode step reads
    # its own block and the top-k blocks by landmark score, the window's worth of keys.
    "landmark_attention": (("configs/mixers/landmark.gin",), (
        "LANDMARK_BLOCK_SIZE = {block}", "LANDMARK_TOP_K = {top_k}",
        f"LANDMARK_VOCAB_SIZE = {VOCAB}", f"LANDMARK_ID = {VOCAB - 1}")),
    "mamba": (("configs/mixers/mamba.gin",), ()),
    "mamba2": (("configs/mixers/mamba2.gin",), ()),
    "lightning": (("configs/mixers/lightning.gin",), ()),
    "s4d": (("configs/mixers/s4d.gin",), ()),
    "gemma3_local_global": (("configs/mixers/gemma3_local_global.gin",),
                            ("LOCAL_WINDOW = {window}",)),
    "rnope_swa": (("configs/mixers/rnope_swa.gin",), ("LOCAL_WINDOW = {window}",)),
    "masformer": (("configs/mixers/masformer.gin",), ("LOCAL_WINDOW = {window}",)),
    "duo_attention": (("configs/mixers/duo_attention.gin",), ("STREAMING_WINDOW = {window}",)),
    "razor_attention": (("configs/mixers/razor_attention.gin",),
                        ("STREAMING_WINDOW = {window}",)),
    "jamba": (("configs/mixers/jamba.gin",), ()),
    "nemotron_h": (("configs/mixers/nemotron_h.gin",), ()),
    "minimax01": (("configs/mixers/minimax01.gin",), ()),
}
# longlora_s2_attn.gin is left out: S²-Attn is training-only, it decodes as full attention.
DEFAULT_LENGTHS = tuple(1024 * 2 ** i for i in range(7))  # 1K ... 64K


def window_for(lengths) -> int:
  """1024, or the shortest length when that is shorter."""
  return min(1024, min(lengths))


def build_model(name: str, window: int):
  """The tiny model of configuration ``name`` (parses gin; eval mode)."""
  from flax import nnx

  # Every module with configurables is imported before gin's configuration is locked.
  from lclm import inference  # noqa: F401  pylint: disable=unused-import
  from lclm.model import DecoderLM

  files, bindings = CONFIGS[name]
  if any(f.endswith("landmark.gin") for f in files):
    # Its gin file binds the data transform that inserts the landmarks: the data stack.
    from lclm.data import landmark  # noqa: F401  pylint: disable=unused-import
  block = max(2, window // 16)
  sizes = {"{window}": window, "{block}": block, "{local}": max(1, window // 4),
           "{top_k}": max(1, window // block - 1)}
  for key, value in sizes.items():
    bindings = [b.replace(key, str(value)) for b in bindings]
  parse_gin([TINY, *files], bindings)
  model = DecoderLM(vocab_size=VOCAB, rngs=nnx.Rngs(0))
  model.eval()
  return model


def cache_bytes(model, batch: int, max_length: int) -> int:
  """Bytes per sequence of ``model.init_cache(batch, max_length)``, computed abstractly."""
  shapes = jax.eval_shape(lambda: model.init_cache(batch, max_length))
  total = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
              for leaf in jax.tree.leaves(shapes))
  return total // batch


def time_decode(model, length: int, *, batch: int, steps: int, chunk: int, seed: int = 0):
  """(prefill tokens/s, decode tokens/s) of generating ``steps`` tokens after ``length``
  random prompt tokens, on a second call after a compiling warm-up call."""
  from lclm import inference

  chunk = min(chunk, length)
  prompt = np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length), dtype=np.int32)
  options = dict(max_new_tokens=steps, prefill_chunk_size=chunk, max_length=length + steps)
  # Warm-up with one chunk of prompt: the same cache, chunk and decode shapes, so every
  # function the timed call runs is compiled here.
  inference.generate(model, prompt[:, :chunk], **options)
  inference.generate(model, prompt, **options)
  times = inference.LAST_TIMES
  return times.prefill_tokens_per_second, times.decode_tokens_per_second


def run(configs, lengths, *, batch: int, steps: int, chunk: int, max_timed_length: int,
        log=print, on_row=None) -> list[dict]:
  """One row per configuration and length (see the module docstring); a configuration that
  fails to build or run gets rows with its ``error`` and the others go on. ``on_row(rows)``
  is called after each row (e.g. to save partial results)."""
  window = window_for(lengths)
  rows = []
  for name in configs:
    try:
      model = build_model(name, window)
      grows = cache_bytes(model, batch, 2 * max(lengths) + steps) > cache_bytes(
          model, batch, max(lengths) + steps)
    except Exception as error:  # noqa: BLE001  (reported in the rows; the others go on)
      log(f"{name}: cannot build: {type(error).__name__}: {error}")
      rows += [{"config": name, "length": n, "error": f"{type(error).__name__}: {error}"[:500],
                "cache_bytes": None, "prefill_tokens_per_second": None,
                "decode_tokens_per_second": None} for n in lengths]
      continue
    for length in lengths:
      row = {"config": name, "layers": list(model.layer_pattern), "length": length,
             "window": window if "{window}" in " ".join(CONFIGS[name][1]) else None,
             "cache_bytes": cache_bytes(model, batch, length + steps), "cache_grows": grows,
             "prefill_tokens_per_second": None, "decode_tokens_per_second": None}
      if length <= max_timed_length or not grows:
        started = time.perf_counter()
        try:
          prefill, decode = time_decode(model, length, batch=batch, steps=steps, chunk=chunk)
          row.update(prefill_tokens_per_second=prefill, decode_tokens_per_second=decode)
        except Exception as error:  # noqa: BLE001
          row["error"] = f"{type(error).__name__}: {error}"[:500]
          log(f"{name} L={length}: {row['error']}")
        row["seconds"] = round(time.perf_counter() - started, 2)
      rows.append(row)
      if on_row is not None:
        on_row(rows)
      log(f"{name:>20} L={length:>6}: cache {row['cache_bytes']:>12,} B/seq, decode "
          f"{_rate(row['decode_tokens_per_second'])} tok/s, prefill "
          f"{_rate(row['prefill_tokens_per_second'])} tok/s"
          + (f" ({row['seconds']} s)" if "seconds" in row else ""))
  return rows


def _rate(value) -> str:
  return "-" if value is None else f"{value:,.0f}"


def _bytes(value) -> str:
  if value is None:
    return "error"
  for unit, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if value >= size:
      return f"{value / size:,.1f} {unit}"
  return f"{value} B"


def format_table(rows: list[dict]) -> str:
  """Three markdown tables (configs x lengths): cache bytes per sequence, decode tokens/s,
  prefill tokens/s."""
  configs = list(dict.fromkeys(r["config"] for r in rows))
  lengths = sorted({r["length"] for r in rows})
  cell = {(r["config"], r["length"]): r for r in rows}
  rate = lambda key: lambda r: "error" if "error" in r else _rate(r[key])
  out = []
  for title, show in (("decode cache per sequence", lambda r: _bytes(r["cache_bytes"])),
                      ("decode tokens/s", rate("decode_tokens_per_second")),
                      ("prefill tokens/s", rate("prefill_tokens_per_second"))):
    out.append(f"| {title} | " + " | ".join(f"{n:,}" for n in lengths) + " |")
    out.append("|---|" + "---:|" * len(lengths))
    for name in configs:
      out.append(f"| {name} | " + " | ".join(
          show(cell[name, n]) if (name, n) in cell else "" for n in lengths) + " |")
    out.append("")
  return "\n".join(out).rstrip() + "\n"


def plot(rows: list[dict], path: str, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  configs = list(dict.fromkeys(r["config"] for r in rows))
  markers = "os^vD<>pPhX*d"
  for i, name in enumerate(configs):
    mine = sorted((r for r in rows if r["config"] == name and r["cache_bytes"]),
                  key=lambda r: r["length"])
    style = dict(marker=markers[i % len(markers)], label=name,
                 linestyle="-" if i < 10 else "--")
    left.plot([r["length"] for r in mine], [r["cache_bytes"] for r in mine], **style)
    timed = [r for r in mine if r["decode_tokens_per_second"]]
    if timed:
      right.plot([r["length"] for r in timed], [r["decode_tokens_per_second"] for r in timed],
                 **style)
  left.set_xscale("log", base=2)
  left.set_yscale("log")
  left.set_xlabel("context length (tokens)")
  left.set_ylabel("decode cache per sequence (bytes)")
  left.set_title("cache size")
  right.set_xscale("log", base=2)
  right.set_yscale("log")
  right.set_xlabel("context length (tokens)")
  right.set_ylabel("decode tokens/s")
  right.set_title("decode speed")
  for ax in (left, right):
    ax.grid(alpha=0.3, which="both")
  right.legend(fontsize=7, ncol=2)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _ints(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def _names(text: str) -> list[str]:
  names = [v.strip() for v in text.split(",") if v.strip()]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
  return names


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmark_decode",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=_ints, default=list(DEFAULT_LENGTHS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--configs", type=_names, default=list(CONFIGS))
  parser.add_argument("--steps", type=int, default=64, help="tokens generated (timed)")
  parser.add_argument("--prefill_chunk_size", type=int, default=1024)
  parser.add_argument("--max_timed_length", type=int, default=None,
                      help="configs whose cache grows with the length (full attention) are "
                           "timed only up to this length (default: all lengths)")
  parser.add_argument("--out", default="benchmarks/results/decode_cpu.json")
  parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.prefill_chunk_size < 1:
    parser.error("--batch, --steps and --prefill_chunk_size must be positive")
  lengths = sorted(set(args.lengths))
  max_timed = args.max_timed_length or max(lengths)
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

  command = "python -m experiments.benchmark_decode " + " ".join(
      sys.argv[1:] if argv is None else argv)
  started = time.perf_counter()
  environment = benchmarking.describe_environment()
  out_dir = os.path.dirname(args.out)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)

  def result_of(rows, complete):
    return {
        "metadata": {**environment, "command": command.strip(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"),
                     "seconds": round(time.perf_counter() - started, 1), "complete": complete},
        "settings": {"lengths": lengths, "batch": args.batch, "steps": args.steps,
                     "prefill_chunk_size": args.prefill_chunk_size,
                     "max_timed_length": max_timed, "window": window_for(lengths),
                     "model": TINY, "vocab_size": VOCAB},
        "rows": rows,
    }

  def save(rows, complete=False):
    with open(args.out, "w") as f:
      json.dump(result_of(rows, complete), f, indent=1)

  rows = run(args.configs, lengths, batch=args.batch, steps=args.steps,
             chunk=args.prefill_chunk_size, max_timed_length=max_timed, on_row=save)
  save(rows, complete=True)
  table = format_table(rows)
  header = (f"Decode cache and speed, tiny models (`{TINY}`), batch {args.batch}, "
            f"{args.steps} new tokens after a prompt of L tokens (prefill chunks of "
            f"{args.prefill_chunk_size}), windows {window_for(lengths)}; "
            f"{environment['device_kind']} ({environment['platform']}, "
            f"{environment['host_cpu_count']} cores), jax {environment['jax_version']}.\n"
            f"Command: `{command.strip()}`\n"
            + (f"Configs with a growing (full-attention) cache are not timed above "
               f"{max_timed:,} tokens (`--max_timed_length`; quadratic prefill): '-'.\n"
               if max_timed < max(lengths) else "") + "\n")
  print(table, flush=True)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(header + table)
  plot(rows, args.plot or os.path.splitext(args.out)[0] + ".png",
       title=f"tiny models, batch {args.batch}, {environment['device_kind']}, "
             f"jax {environment['jax_version']}")
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
