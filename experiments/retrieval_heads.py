"""Finds a model's retrieval heads on needle examples and writes the DuoAttention config.

    python -m experiments.retrieval_heads --workdir=runs/my-run --out=runs/my-run/heads \
        [--task=passkey|niah_single|niah_multikey] [--step=N] [--examples=64]
        [--lengths=1024,2048] [--retrieval_fraction=0.25 |
        --threshold=0.1] [--streaming_window=256] [--num_sink_tokens=4]

The model (a training run, an ``experiments.convert_hf`` directory or a Hugging Face folder:
:func:`lclm.evals.loading.load_model`) reads ``--examples`` needle examples at each length
(``--task=passkey``: :func:`lclm.evals.retrieval_heads.passkey_batches`, byte tokens, the
needle sentence as the needle; ``--task=niah_single`` / ``niah_multikey``:
:func:`lclm.evals.retrieval_heads.niah_batches`, token-level needles over the model's own
vocabulary, the queried ``KEY k VALUE v SEP`` as the needle) and every attention head gets its copy-paste score
(:func:`lclm.evals.retrieval_heads.retrieval_counts`, over all lengths together). ``--out``
gets:

* ``retrieval_scores.json``: the scores ([layer][head], null off attention layers), the
  retrieval heads chosen, the model's answer-token accuracy, the settings and provenance
  (:func:`lclm.provenance.collect`);
* ``retrieval_heads.png``: the layer x head heatmap of the scores;
* ``duo_attention.gin``: ``DecoderLM.layer_options`` with each attention layer's
  ``per_head_windows`` (:func:`lclm.evals.retrieval_heads.per_head_windows_config`): include
  it after the model's configuration to run it DuoAttention-style.

and the scores are printed as a table. The passkey bytes (ids < 259) must fit the model's
vocabulary; for a model with another tokenizer they are not its text (a warning says so):
probe such a model with batches of its own (the library function). Exit codes: 0 done, 2 bad
arguments, a missing or unreadable run, or a vocabulary too small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

DEFAULT_LENGTHS = "1024,2048"
BYTE_VOCAB = 259  # lclm.data.tokenizer.ByteTokenizer().vocab_size


def _parser():
  parser = argparse.ArgumentParser(
      prog="python -m experiments.retrieval_heads",
      description="Retrieval-head probe on needle examples; writes scores, a heatmap and "
                  "the DuoAttention per_head_windows gin config.")
  parser.add_argument("--workdir", required=True,
                      help="run directory, converted checkpoint or Hugging Face folder")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="extra gin binding applied over the run's config.gin")
  parser.add_argument("--examples", type=int, default=64, help="needle examples per length")
  parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                      help=f"comma-separated sequence lengths (default {DEFAULT_LENGTHS})")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--task", choices=("passkey", "niah_single", "niah_multikey"),
                      default="passkey",
                      help="needle examples: byte-level passkey text (vocabulary >= 259) or "
                      "token-level needles over the model's own vocabulary")
  parser.add_argument("--num_digits", type=int, default=5, help="digits of the pass key")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--retrieval_fraction", type=float, default=None,
                      help="fraction of all heads kept as retrieval heads (default 0.25 "
                           "unless --threshold is given)")
  parser.add_argument("--threshold", type=float, default=None,
                      help="retrieval heads: those scoring at least this")
  parser.add_argument("--streaming_window", type=int, default=256,
                      help="tokens a streaming head sees, itself included")
  parser.add_argument("--num_sink_tokens", type=int, default=4)
  parser.add_argument("--require_correct", action=argparse.BooleanOptionalAction, default=True,
                      help="count an answer token only where the model predicts it "
                           "(--no-require_correct: attention alone)")
  parser.add_argument("--query_chunk_size", type=int, default=32,
                      help="answer rows per attention chunk")
  return parser


class UsageError(ValueError):
  """Bad command-line input (exit code 2)."""


def parse_lengths(text: str, num_digits: int, task: str = "passkey") -> list[int]:
  """Sorted distinct lengths of ``--lengths``; each must hold a passkey prompt (token-level
  needles are checked when their batches are built)."""
  from lclm.data import passkey  # pylint: disable=import-outside-toplevel

  try:
    lengths = sorted({int(part) for part in text.split(",") if part.strip()})
  except ValueError:
    raise UsageError(f"--lengths must be comma-separated ints, got {text!r}.") from None
  if not lengths:
    raise UsageError(f"--lengths names no length: {text!r}.")
  shortest = passkey.min_seq_len(num_digits)
  if task == "passkey" and lengths[0] < shortest:
    raise UsageError(f"--lengths: {lengths[0]} cannot hold a passkey prompt with "
                     f"{num_digits}-digit keys; use lengths >= {shortest}.")
  return lengths


def _check_args(args) -> None:
  for name in ("examples", "batch_size", "num_digits", "streaming_window", "query_chunk_size"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name} must be a positive int, got {getattr(args, name)}.")
  if args.num_sink_tokens < 0:
    raise UsageError(f"--num_sink_tokens must be >= 0, got {args.num_sink_tokens}.")
  if args.retrieval_fraction is not None and args.threshold is not None:
    raise UsageError("give --retrieval_fraction or --threshold, not both.")
  if args.threshold is None and args.retrieval_fraction is None:
    args.retrieval_fraction = 0.25
  if args.retrieval_fraction is not None and not 0 < args.retrieval_fraction <= 1:
    raise UsageError(f"--retrieval_fraction must be in (0, 1], got {args.retrieval_fraction}.")
  if not os.path.isdir(args.workdir):
    raise UsageError(f"--workdir {args.workdir} is not a directory (a training run, a converted "
                     "checkpoint or a Hugging Face folder).")


def format_table(scores: np.ndarray, layer_pattern) -> str:
  """The scores as a text table: one row per layer, one column per head."""
  heads = scores.shape[1]
  header = f"{'layer':>5}  {'mixer':<18}" + "".join(f"{'h' + str(h):>7}" for h in range(heads))
  lines = [header]
  for layer, row in enumerate(scores):
    cells = "".join(f"{s:7.3f}" if np.isfinite(s) else f"{'-':>7}" for s in row)
    lines.append(f"{layer:>5}  {str(layer_pattern[layer]):<18}{cells}")
  return "\n".join(lines)


def plot_heatmap(scores: np.ndarray, path: str, title: str) -> None:
  """Writes the layer x head heatmap of ``scores`` (NaN cells blank) to ``path``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  layers, heads = scores.shape
  fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * heads + 2), max(3.0, 0.35 * layers + 1.5)))
  image = ax.imshow(np.ma.masked_invalid(scores), vmin=0.0, vmax=1.0, cmap="viridis",
                    aspect="auto", interpolation="nearest")
  fig.colorbar(image, ax=ax, label="retrieval (copy-paste) score")
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_xticks(range(heads))
  ax.set_yticks(range(layers))
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _json_scores(scores: np.ndarray) -> list[list[float | None]]:
  return [[float(s) if np.isfinite(s) else None for s in row] for row in scores]


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    _check_args(args)
    lengths = parse_lengths(args.lengths, args.num_digits, args.task)
  except UsageError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2

  # Imported late: parsing and error reporting stay fast.
  from lclm import provenance
  from lclm.data import tokenizer as tokenizer_lib
  from lclm.evals import loading
  from lclm.evals import retrieval_heads as probe

  from experiments import train as train_main
  from lclm.training import checkpointing

  try:
    loaded = loading.load_model(args.workdir, step=args.step, gin_params=args.gin_param,
                                search_paths=[train_main.REPO_ROOT])
  except (FileNotFoundError, ValueError, TypeError,
          checkpointing.UnreadableCheckpointsError) as error:
    print(f"error: cannot load a model from {args.workdir}: {error}", file=sys.stderr)
    return 2
  except RuntimeError as error:
    return train_main.missing_binding_exit(error)
  if args.task == "passkey" and loaded.vocab_size < BYTE_VOCAB:
    print(f"error: the model's vocabulary ({loaded.vocab_size} tokens) is too small for the "
          f"passkey task's byte tokens (ids 0 ... {BYTE_VOCAB - 1}); probe it with "
          "token-level needles over its own vocabulary (--task=niah_single).",
          file=sys.stderr)
    return 2
  if args.task == "passkey" and loaded.tokenizer is not None and not isinstance(
      loaded.tokenizer, tokenizer_lib.ByteTokenizer):
    print("warning: the model's tokenizer is not the byte tokenizer: the passkey byte ids are "
          "not its text, so the scores say little.", file=sys.stderr)

  batches = []
  try:
    for length in lengths:
      if args.task == "passkey":
        batches += probe.passkey_batches(length, num_examples=args.examples,
                                         batch_size=args.batch_size, seed=args.seed + length,
                                         num_digits=args.num_digits)
      else:
        batches += probe.niah_batches(length, vocab_size=loaded.vocab_size,
                                      num_examples=args.examples, batch_size=args.batch_size,
                                      seed=args.seed + length,
                                      variant=args.task.split("_", 1)[1])
    counts = probe.retrieval_counts(loaded.model, batches, require_correct=args.require_correct,
                                    query_chunk_size=args.query_chunk_size)
    scores = counts.scores
    pattern = list(loaded.model.layer_pattern)
    source = (f"{os.path.abspath(args.workdir)} (step {loaded.step}), {args.task} lengths "
              f"{lengths}")
    config = probe.per_head_windows_config(
        scores, retrieval_fraction=args.retrieval_fraction, threshold=args.threshold,
        streaming_window=args.streaming_window, num_sink_tokens=args.num_sink_tokens,
        layer_pattern=pattern, source=source)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  chosen = probe.select_retrieval_heads(scores, retrieval_fraction=args.retrieval_fraction,
                                        threshold=args.threshold)

  os.makedirs(args.out, exist_ok=True)
  own_config = os.path.join(args.workdir, "config.gin")
  gin_text = None
  if os.path.isfile(own_config):
    with open(own_config) as f:
      gin_text = f.read()
  accuracy = counts.correct_tokens / counts.answer_tokens
  record = {
      "scores": _json_scores(scores),
      "retrieval_heads": [[int(l), int(h)] for l, h in zip(*np.nonzero(chosen))],
      "layer_pattern": pattern,
      "attention_layers": list(counts.attention_layers),
      "answer_tokens": counts.answer_tokens,
      "correct_tokens": counts.correct_tokens,
      "answer_token_accuracy": accuracy,
      "settings": {
          "workdir": os.path.abspath(args.workdir), "step": loaded.step, "kind": loaded.kind,
          "task": args.task, "lengths": lengths, "examples_per_length": args.examples,
          "num_digits": args.num_digits, "seed": args.seed,
          "require_correct": args.require_correct,
          "retrieval_fraction": args.retrieval_fraction, "threshold": args.threshold,
          "streaming_window": args.streaming_window, "num_sink_tokens": args.num_sink_tokens,
      },
      "provenance": provenance.collect(seed=args.seed, gin_config=gin_text),
  }
  with open(os.path.join(args.out, "retrieval_scores.json"), "w") as f:
    json.dump(record, f, indent=2)
  plot_heatmap(scores, os.path.join(args.out, "retrieval_heads.png"),
               f"retrieval heads: {os.path.basename(os.path.abspath(args.workdir))}, "
               f"step {loaded.step}, {args.task} {','.join(map(str, lengths))}")
  with open(os.path.join(args.out, "duo_attention.gin"), "w") as f:
    f.write(config)

  print(format_table(scores, pattern))
  print(f"answer tokens: {counts.answer_tokens}, predicted right: {counts.correct_tokens} "
        f"({accuracy:.1%}); retrieval heads: {int(chosen.sum())} of "
        f"{int(np.isfinite(scores).sum())}")
  note = probe.tie_note(scores, chosen)
  if note:
    print(f"note: {note}")
  if args.require_correct and counts.correct_tokens == 0:
    print("note: the model predicted no answer token, so every score is 0; "
          "--no-require_correct scores attention alone.")
  print(f"wrote {args.out}/retrieval_scores.json, retrieval_heads.png, duo_attention.gin")
  return 0


if __name__ == "__main__":
  sys.exit(main())
