"""Generates text (or token ids) from a trained run: restores its newest checkpoint, encodes
the prompt with the run's tokenizer, decodes with the KV / recurrent-state cache and prints
the continuation and the prefill and decode speeds.

    python -m experiments.generate --gin_file=configs/experiments/stuffed_mamba.gin \
        --workdir=runs/stuffed_mamba/state-16 --prompt="What is the pass key?" \
        [--max_new_tokens=64 --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 \
         --prefill_chunk_size=1024 --stop_tokens=2 --tokenizer=/path/to/hf_model_folder]
    python -m experiments.generate --workdir=runs/quickstart-... --prompt_tokens=5,130,7,141,5

Without ``--gin_file`` the run's own operative configuration (``RUN_DIR/config.gin``, which
every training run writes) is used; with it, the files and ``--gin_param`` bindings are
parsed as ``experiments.train`` parses them (they must describe the run's model). Text
prompts (``--prompt`` / ``--prompt_file``) need a tokenizer (the task's or ``--tokenizer``);
token-id tasks (MQAR) take ``--prompt_tokens``, a comma-separated list of ids, which every
task accepts.

The tokenizer is the task's (``TextTask.tokenizer``: bytes or a real vocabulary; passkey:
bytes); ``--tokenizer`` overrides it with ``byte`` or a folder / file that
``lclm.data.tokenizer.load_tokenizer`` reads (``tokenizer.json`` or ``tokenizer.model``). A
directory written by ``experiments.convert_hf`` has no task: its vocabulary is the
checkpoint's and its tokenizer the copied ``WORKDIR/tokenizer`` (if the checkpoint had one). A
text prompt starts with the tokenizer's bos token when it has one. Generation stops after any
of the tokenizer's eos ids unless ``--stop_tokens`` names the stop ids (``--stop_tokens=``
(empty) never stops early); token-id tasks stop only on ``--stop_tokens``. Only the model's
parameters are restored (:func:`lclm.training.restore.restore_params`).

Speeds are measured on a second call after a warm-up call with the same shapes (the first
call compiles); the printed line says so. Exit codes: 0 done, 2 bad configuration, bad
prompt, or a run directory without a checkpoint.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from experiments import train as train_main
from lclm.evals import loading


class PromptError(ValueError):
  """The prompt cannot be encoded for this run."""


def tokenizer_for(task, name: str | None = None):
  """The tokenizer of the prompt: ``load_tokenizer(name)`` when a name (``--tokenizer``) is
  given, else the task's ``tokenizer`` (None for token-id tasks such as MQAR)."""
  try:
    return loading.tokenizer_for(task, name)
  except (FileNotFoundError, ValueError) as error:
    raise PromptError(f"--tokenizer: {error}") from None


def stop_ids(stop_tokens: str | None, tokenizer, vocab_size: int) -> tuple[int, ...]:
  """The ids after which a row stops: ``--stop_tokens`` when given (comma-separated; empty
  for none), else the tokenizer's eos ids that lie in the model's vocabulary."""
  if stop_tokens is None:
    eos = getattr(tokenizer, "eos_ids", ()) if tokenizer is not None else ()
    return tuple(int(t) for t in eos if 0 <= t < vocab_size)
  try:
    return tuple(int(t) for t in stop_tokens.split(",") if t.strip())
  except ValueError:
    raise PromptError(f"--stop_tokens must be comma-separated integer ids, got "
                      f"{stop_tokens!r}.") from None


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
  ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None).astype(np.int32)
  if not ids.size:
    raise PromptError("the prompt is empty (no token).")
  if ids.max() >= vocab_size:
    raise PromptError(f"the tokenizer {tokenizer!r} gives ids up to {ids.max()}, outside the "
                      f"model's vocabulary [0, {vocab_size}); use the run's tokenizer.")
  return ids


def _parser():
  parser = train_main.gin_argument_parser("python -m experiments.generate",
                                          __doc__.split("\n")[0])
  prompt = parser.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="prompt text (tasks with a tokenizer, or --tokenizer)")
  prompt.add_argument("--prompt_file", help="file holding the prompt text (UTF-8)")
  prompt.add_argument("--prompt_tokens", help="prompt as comma-separated token ids, e.g. 1,2,3")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prefill_chunk_size", type=int, default=None)
  parser.add_argument("--stop_tokens", default=None,
                      help="comma-separated ids after which a row stops (default: the "
                      "tokenizer's eos ids; empty: none)")
  parser.add_argument("--tokenizer", default=None,
                      help="'byte' or a folder / file with tokenizer.json or tokenizer.model "
                      "(default: the task's tokenizer)")
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
    task = loading.build_task(args.workdir)
    tokenizer = tokenizer_for(task, args.tokenizer)
    prompt = encode_prompt(args, tokenizer, task.vocab_size)
    stops = stop_ids(args.stop_tokens, tokenizer, task.vocab_size)
  except (train_main.ConfigError, PromptError, ValueError, TypeError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except RuntimeError as error:
    return train_main.missing_binding_exit(error)

  # Imported late: building the parser and reporting bad flags stays fast.
  from flax import nnx

  from lclm import inference
  from lclm.model import DecoderLM
  from lclm.training import checkpointing, restore

  try:
    step, model = restore.restore_params(
        args.workdir, lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)))
  except (FileNotFoundError, checkpointing.UnreadableCheckpointsError) as error:
    print(f"error: no usable checkpoint: {error}", file=sys.stderr)
    return 2
  except ValueError as error:  # The configured model does not match the checkpoint.
    print(f"error: {error}", file=sys.stderr)
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
    # Ids past the tokenizer's vocabulary (a larger embedding) have no text.
    print(f"generated: {tokenizer.decode(tokens[tokens < tokenizer.vocab_size])!r}")
  print(f"generated tokens: {','.join(str(int(t)) for t in tokens)}")
  print(f"prefill {times.prefill_tokens_per_second:,.1f} tokens/s ({times.prompt_tokens} "
        f"tokens in {times.prefill_seconds * 1e3:.1f} ms), decode "
        f"{times.decode_tokens_per_second:,.1f} tokens/s ({times.new_tokens} tokens in "
        f"{times.decode_seconds * 1e3:.1f} ms); timed on a second call after a warm-up call "
        "that compiles", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
