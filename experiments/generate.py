"""Generates text (or token ids) from a trained run: restores its newest checkpoint, encodes
the prompt with the run's tokenizer, decodes with the KV / recurrent-state cache and prints
the continuation and the prefill and decode speeds.

    python -m experiments.generate --gin_file=configs/experiments/stuffed_mamba.gin \
        --workdir=runs/stuffed_mamba/state-16 --prompt="What is the pass key?" \
        [--max_new_tokens=64 --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 \
         --prefill_chunk_size=1024 --stop_tokens=2]
    python -m experiments.generate --workdir=runs/quickstart-... --prompt_tokens=5,130,7,141,5

Without ``--gin_file`` the run's own operative configuration (``RUN_DIR/config.gin``, which
every training run writes) is used; with it, the files and ``--gin_param`` bindings are
parsed as ``experiments.train`` parses them (they must describe the run's model). Text
prompts (``--prompt`` / ``--prompt_file``) need a task with a text tokenizer (passkey, text:
the byte tokenizer, a bos token first); token-id tasks (MQAR) take ``--prompt_tokens``, a
comma-separated list of ids, which every task accepts.

Speeds are measured on a second call after a warm-up call with the same shapes (the first
call compiles); the printed line says so. Exit codes: 0 done, 2 bad configuration, bad
prompt, or a run directory without a checkpoint.
"""

from __future__ import annotations

import os
import sys
import warnings

import gin
import numpy as np

from experiments import train as train_main
from lclm.data.tokenizer import ByteTokenizer

# Tasks whose tokens are bytes (lclm.tasks: PasskeyTask, TextTask); others are raw ids.
_BYTE_TASKS = ("passkey", "text")


class PromptError(ValueError):
  """The prompt cannot be encoded for this run."""


def tokenizer_for(task):
  """The task's tokenizer: ByteTokenizer for byte-level tasks, None for token-id tasks."""
  return ByteTokenizer() if getattr(task, "name", None) in _BYTE_TASKS else None


def _build_task():
  ref = gin.query_parameter("train.task")
  if isinstance(ref, gin.config.ConfigurableReference):
    return ref.configurable.wrapper()
  raise train_main.ConfigError(f"train.task must be bound to a task class such as @MqarTask, "
                               f"got {ref!r}.")


def encode_prompt(args, tokenizer, vocab_size: int) -> np.ndarray:
  """int32 [prompt_len] ids of the prompt given by --prompt, --prompt_file or --prompt_tokens."""
  if args.prompt_tokens is not None:
    try:
      ids = [int(t) for t in args.prompt_tokens.replace(" ", "").split(",") if t != ""]
    except ValueError:
      raise PromptError(f"--prompt_tokens must be comma-separated integer ids, got "
                        f"{args.prompt_tokens!r}.") from None
    if not ids:
      raise PromptError("--prompt_tokens is empty.")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
      raise PromptError(f"--prompt_tokens: ids {bad} lie outside the vocabulary [0, "
                        f"{vocab_size}).")
    return np.asarray(ids, np.int32)
  if tokenizer is None:
    raise PromptError("this run's task has no text tokenizer (its inputs are token ids, e.g. "
                      "MQAR); pass the prompt as --prompt_tokens=1,2,3.")
  if args.prompt_file is not None:
    try:
      with open(args.prompt_file, encoding="utf-8") as f:
        text = f.read()
    except OSError as error:
      raise PromptError(f"--prompt_file: {error}") from None
  else:
    text = args.prompt
  return tokenizer.encode(text, add_bos=True).astype(np.int32)


def _parser():
  parser = train_main.gin_argument_parser("python -m experiments.generate",
                                          __doc__.split("\n")[0])
  prompt = parser.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="prompt text (byte-level tasks)")
  prompt.add_argument("--prompt_file", help="file holding the prompt text (UTF-8)")
  prompt.add_argument("--prompt_tokens", help="prompt as comma-separated token ids, e.g. 1,2,3")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prefill_chunk_size", type=int, default=None)
  parser.add_argument("--stop_tokens", default="",
                      help="comma-separated ids after which a row stops (e.g. 2: eos)")
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  gin_files = list(args.gin_file)
  if not gin_files:
    own = os.path.join(args.workdir, "config.gin")
    if not os.path.exists(own):
      print(f"error: no --gin_file given and {args.workdir} has no config.gin; is it a "
            "training run directory (experiments.train --workdir=...)?", file=sys.stderr)
      return 2
    gin_files = [own]
  try:
    train_main.parse_gin(gin_files, args.gin_param)
    task = _build_task()
    total_steps = int(gin.query_parameter("train.total_steps"))
    tokenizer = tokenizer_for(task)
    prompt = encode_prompt(args, tokenizer, task.vocab_size)
    stops = tuple(int(t) for t in args.stop_tokens.split(",") if t.strip())
  except (train_main.ConfigError, PromptError, ValueError, TypeError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except RuntimeError as error:
    if "Required bindings" not in str(error):
      raise
    print(f"error: bad gin configuration: {error}", file=sys.stderr)
    return 2

  # Imported late: building the parser and reporting bad flags stays fast.
  from flax import nnx

  from lclm import inference
  from lclm.model import DecoderLM
  from lclm.training import checkpointing, restore

  try:
    step, model = restore.restore_trained_model(
        args.workdir, lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)),
        total_steps=total_steps)
  except (FileNotFoundError, checkpointing.UnreadableCheckpointsError) as error:
    print(f"error: no usable checkpoint: {error}", file=sys.stderr)
    return 2
  model.eval()
  # On CPU jax cannot reuse the donated cache buffers; harmless, and noise for a user.
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

  options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops,
                 prefill_chunk_size=args.prefill_chunk_size)
  try:
    inference.generate(model, prompt[None], **options)  # Warm-up: compiles.
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  tokens = np.asarray(inference.generate(model, prompt[None], **options))[0]
  times = inference.LAST_TIMES
  if stops:  # Drop what follows the first stop token (the row repeats it).
    hits = np.flatnonzero(np.isin(tokens, stops))
    tokens = tokens[:hits[0] + 1] if hits.size else tokens
  print(f"run {args.workdir}, checkpoint step {step}, task {task.name}, prompt "
        f"{prompt.size} tokens")
  if tokenizer is not None:
    print(f"prompt: {tokenizer.decode(prompt)!r}")
    print(f"generated: {tokenizer.decode(tokens)!r}")
  print(f"generated tokens: {','.join(str(int(t)) for t in tokens)}")
  print(f"prefill {times.prefill_tokens_per_second:,.1f} tokens/s ({times.prompt_tokens} "
        f"tokens in {times.prefill_seconds * 1e3:.1f} ms), decode "
        f"{times.decode_tokens_per_second:,.1f} tokens/s ({times.new_tokens} tokens in "
        f"{times.decode_seconds * 1e3:.1f} ms); timed on a second call after a warm-up call "
        "that compiles", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
