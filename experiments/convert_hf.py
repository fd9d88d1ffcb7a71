"""Converts a Hugging Face checkpoint folder to an lclm run directory, and back.

    python -m experiments.convert_hf --hf_dir=path/to/Llama-3.2-1B --workdir=runs/llama1b \
        [--dtype=float32]
    python -m experiments.convert_hf --to_hf --workdir=runs/llama1b-long --hf_dir=out/ \
        --architecture=llama [--gin_file=... --gin_param=...]

Forward (Hugging Face -> lclm), ``WORKDIR`` gets:

* ``checkpoints/0/``: the parameters (an Orbax train state with an empty optimizer state),
  which ``train.init_from = "WORKDIR"`` and :func:`lclm.training.restore.restore_params`
  read;
* ``model.gin``: the ``DecoderLM`` bindings of the checkpoint (``include`` it in a training
  config; the macro ``HF_VOCAB_SIZE`` holds the vocabulary size the task must give the
  model, ``HF_ROPE_THETA`` the RoPE base of its full-attention layers);
* ``config.gin``: the same bindings, the run's operative configuration for
  ``experiments.generate --workdir=WORKDIR`` (which then takes the tokenizer below);
* ``tokenizer/``: the checkpoint's tokenizer files (``tokenizer.json``, ``tokenizer.model``,
  their configs), when it has them; ``hf_config.json``: the source config.

Reverse (``--to_hf``): the model of ``WORKDIR``'s ``config.gin`` (or the ``--gin_file`` /
``--gin_param`` given), with the parameters of its newest checkpoint, is written with
:func:`lclm.hf.save_pretrained` as ``--architecture``; the tokenizer files of
``WORKDIR/tokenizer`` (or of a run initialised from a converted folder, via
``--tokenizer_dir``) are copied beside it.

Exit codes: 0 done, 2 bad arguments, a missing or unreadable checkpoint, or a model the
target format cannot express.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "added_tokens.json")


def _parser():
  from experiments import train as train_main  # pylint: disable=import-outside-toplevel

  # --gin_file / --gin_param (--to_hf: the run's model, default WORKDIR/config.gin), --workdir.
  parser = train_main.gin_argument_parser("python -m experiments.convert_hf",
                                          __doc__.split("\n")[0])
  parser.add_argument("--hf_dir", required=True, help="Hugging Face checkpoint folder")
  parser.add_argument("--to_hf", action="store_true", help="lclm -> Hugging Face")
  parser.add_argument("--dtype", default=None,
                      help="parameter dtype (default: the checkpoint's / the model's)")
  parser.add_argument("--architecture", default=None,
                      help="--to_hf: the Hugging Face architecture (llama, mistral, qwen2, "
                           "mamba2)")
  parser.add_argument("--tokenizer_dir", default=None,
                      help="--to_hf: folder whose tokenizer files go beside the weights "
                           "(default WORKDIR/tokenizer when it exists)")
  return parser


def copy_tokenizer(source: str, target: str) -> list[str]:
  """Copies the tokenizer files of ``source`` into ``target``; returns their names."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
  if names:
    os.makedirs(target, exist_ok=True)
    for name in names:
      shutil.copy2(os.path.join(source, name), os.path.join(target, name))
  return names


def to_lclm(hf_dir: str, workdir: str, dtype: str | None = None) -> str:
  """Writes the lclm run directory of ``hf_dir`` (see the module docstring); returns a
  one-line summary."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lclm import hf  # pylint: disable=import-outside-toplevel
  from lclm.training import checkpointing  # pylint: disable=import-outside-toplevel

  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileExistsError(f"{workdir} already holds checkpoints/; convert into a new directory.")
  config = hf.read_config(hf_dir)
  options = hf.model_options(config, dtype=dtype)
  model = hf.load_pretrained(hf_dir, dtype=dtype)
  os.makedirs(workdir, exist_ok=True)
  checkpointing.save_params_checkpoint(workdir, model)
  params = nnx.state(model, nnx.Param)
  bindings = hf.gin_config(options, source=os.path.abspath(hf_dir))
  theta = (options.get("position_options") or {}).get("rope_theta")
  if theta is not None:
    bindings += f"HF_ROPE_THETA = {float(theta)!r}\n"
  with open(os.path.join(workdir, "model.gin"), "w") as f:
    f.write(bindings)
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write("# Written by experiments.convert_hf: the converted model, no task.\n" + bindings)
  with open(os.path.join(workdir, "hf_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  copied = copy_tokenizer(hf_dir, os.path.join(workdir, "tokenizer"))
  count = sum(int(v.size) for v in jax.tree.leaves(params))
  return (f"converted {config.get('model_type')} ({count:,} parameters, "
          f"{options['dtype']}) from {hf_dir} to {workdir}; tokenizer files: "
          f"{copied or 'none'}")


def to_hf(workdir: str, hf_dir: str, architecture: str, *, gin_files=(), gin_params=(),
          dtype: str | None = None, tokenizer_dir: str | None = None) -> str:
  """Writes the model of the run ``workdir`` as a Hugging Face checkpoint; returns a
  one-line summary."""
  import gin  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from experiments import train as train_main  # pylint: disable=import-outside-toplevel
  from lclm import hf  # pylint: disable=import-outside-toplevel
  from lclm.model import DecoderLM  # pylint: disable=import-outside-toplevel
  from lclm.training import restore  # pylint: disable=import-outside-toplevel

  gin_files = list(gin_files) or [os.path.join(workdir, "config.gin")]
  if not os.path.isfile(gin_files[0]):
    raise FileNotFoundError(f"{gin_files[0]} does not exist; pass --gin_file describing the "
                            "run's model.")
  if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
    raise FileNotFoundError(f"--tokenizer_dir {tokenizer_dir!r} is not a directory.")
  train_main.parse_gin(gin_files, list(gin_params))
  directory = restore.checkpoint_directory(workdir)
  if directory is None:
    raise FileNotFoundError(f"{workdir} has no checkpoints/ directory.")
  vocab_size = _vocab_size_of(gin, restore, directory)
  at_step, model = restore.restore_params(
      workdir, lambda: DecoderLM(vocab_size=vocab_size, rngs=nnx.Rngs(0)))
  hf.save_pretrained(model, hf_dir, architecture=architecture, dtype=dtype)
  source = tokenizer_dir or os.path.join(workdir, "tokenizer")
  copied = copy_tokenizer(source, hf_dir) if os.path.isdir(source) else []
  return (f"wrote {architecture} from {workdir} (step {at_step}) to {hf_dir}; tokenizer "
          f"files: {copied or 'none'}")


def _vocab_size_of(gin, restore, directory) -> int:
  """The vocabulary of the run's model: ``HF_VOCAB_SIZE`` of a converted run, else the row
  count of the checkpoint's embedding."""
  try:
    return int(gin.query_parameter("%HF_VOCAB_SIZE"))
  except ValueError:
    pass
  shapes = restore.checkpoint_param_shapes(directory)
  for path, shape in shapes.items():
    if tuple(path[-2:]) == ("embed", "embedding"):
      return int(shape[0])
  raise ValueError(f"cannot tell the vocabulary size of the checkpoint in {directory}.")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.to_hf and not args.architecture:
    print("error: --to_hf needs --architecture (llama, mistral, qwen2, mamba2)", file=sys.stderr)
    return 2
  try:
    if args.to_hf:
      summary = to_hf(args.workdir, args.hf_dir, args.architecture, gin_files=args.gin_file,
                      gin_params=args.gin_param, dtype=args.dtype,
                      tokenizer_dir=args.tokenizer_dir)
    else:
      summary = to_lclm(args.hf_dir, args.workdir, args.dtype)
  except (FileNotFoundError, FileExistsError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(summary, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
