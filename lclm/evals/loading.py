"""A model to evaluate: a training run's checkpoint, a converted checkpoint, or a Hugging Face
folder.

    loaded = load_model("runs/quickstart-...")            # newest checkpoint, the run's config
    loaded = load_model("runs/x", step=500)               # a named step
    loaded = load_model("runs/converted-llama")           # experiments.convert_hf output
    loaded = load_model("/models/Llama-3.2-1B")           # a Hugging Face folder (safetensors)
    loaded.model, loaded.vocab_size, loaded.tokenizer, loaded.task, loaded.step

A run directory is read with its own operative configuration (``RUN_DIR/config.gin``, written
by every training run and by ``experiments.convert_hf``) unless gin files are given; extra
``gin_params`` apply on top, so a checkpoint can be evaluated with other static options (e.g.
``DecoderLM.position_options`` for YaRN): parameters do not depend on them. Only the model's
parameters are read (:func:`lclm.training.restore.restore_params`).

A Hugging Face folder (``config.json`` and safetensors weights, no ``checkpoints/``) is
imported with :func:`lclm.hf.load_pretrained`; its tokenizer is the folder's
``tokenizer.json`` / ``tokenizer.model`` when present.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import gin

from lclm import tasks as _tasks  # noqa: F401  (registers the task configurables)
from lclm.data import tokenizer as tokenizer_lib
from lclm.training import loop as _loop  # noqa: F401  (registers train.* for config.gin)

# Tasks whose tokens are bytes when the task object names no tokenizer of its own.
_BYTE_TASKS = ("passkey", "text")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class RunConfigError(ValueError):
  """The run's gin configuration cannot be applied or describes no model to evaluate."""


@dataclasses.dataclass
class LoadedModel:
  """A model ready to evaluate.

  Attributes:
    model: the :class:`lclm.model.DecoderLM` (in eval mode).
    vocab_size: the model's vocabulary (its embedding rows).
    tokenizer: the text tokenizer of its inputs, or None (token-id tasks such as MQAR).
    task: the run's training task (None for a converted or Hugging Face checkpoint).
    step: the checkpoint's step (None for a Hugging Face folder).
    source: the directory it came from.
    kind: ``"run"`` (a training run), ``"converted"`` (``experiments.convert_hf``) or ``"hf"``.
  """
  model: Any
  vocab_size: int
  tokenizer: Any
  task: Any
  step: int | None
  source: str
  kind: str


class ConvertedModel:
  """The "task" of a run directory written by ``experiments.convert_hf``: no data, the
  checkpoint's vocabulary (``HF_VOCAB_SIZE``) and its tokenizer (``WORKDIR/tokenizer``)."""

  name = "pretrained"

  def __init__(self, workdir: str, vocab_size: int):
    self.vocab_size = vocab_size
    self.tokenizer = _folder_tokenizer(os.path.join(workdir, "tokenizer"))


def _folder_tokenizer(folder: str):
  if any(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_FILES):
    return tokenizer_lib.load_tokenizer(folder)
  return None


def parse_config(gin_files: Sequence[str], gin_params: Sequence[str] = (), *,
                 search_paths: Sequence[str] = ()) -> None:
  """Clears gin and parses ``gin_files`` then ``gin_params``; raises RunConfigError naming the
  bad file or binding. ``search_paths`` resolve relative ``include``s."""
  gin.clear_config()
  for path in search_paths:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_params),
                                        finalize_config=False)
    gin.finalize()
  except (ValueError, KeyError, TypeError, OSError, SyntaxError) as error:
    raise RunConfigError(f"bad gin configuration: {error}\n(files: {list(gin_files)}, "
                         f"bindings: {list(gin_params)})") from error


def build_task(workdir: str):
  """The configured ``train.task`` (built), or a :class:`ConvertedModel` for a converted
  checkpoint's configuration (which binds ``HF_VOCAB_SIZE`` and no task)."""
  try:
    ref = gin.query_parameter("train.task")
  except ValueError:
    try:
      return ConvertedModel(workdir, int(gin.query_parameter("%HF_VOCAB_SIZE")))
    except ValueError:
      raise RunConfigError("the configuration binds no train.task (and is not a converted "
                           "checkpoint's, which sets HF_VOCAB_SIZE).") from None
  if isinstance(ref, gin.config.ConfigurableReference):
    return ref.configurable.wrapper()
  raise RunConfigError(f"train.task must be bound to a task class such as @MqarTask, got "
                       f"{ref!r}.")


def tokenizer_for(task, name: str | None = None):
  """``load_tokenizer(name)`` when a name is given, else the task's ``tokenizer`` (None for
  token-id tasks such as MQAR)."""
  if name is not None:
    return tokenizer_lib.load_tokenizer(name)
  if hasattr(task, "tokenizer"):
    return task.tokenizer
  return tokenizer_lib.ByteTokenizer() if getattr(task, "name", None) in _BYTE_TASKS else None


def is_hf_folder(path: str) -> bool:
  """A Hugging Face model folder: ``config.json`` and no lclm ``checkpoints/``."""
  return (os.path.isfile(os.path.join(path, "config.json"))
          and not os.path.isdir(os.path.join(path, "checkpoints")))


def load_run(workdir: str, *, gin_files: Sequence[str] = (), gin_params: Sequence[str] = (),
             step: int | None = None, tokenizer: str | None = None,
             search_paths: Sequence[str] = ()) -> LoadedModel:
  """The model of a training run (or of an ``experiments.convert_hf`` directory).

  Args:
    workdir: the run directory.
    gin_files: the configuration (default: ``workdir/config.gin``).
    gin_params: bindings applied after the files (e.g. other position options).
    step: the checkpoint to read (default the newest readable one).
    tokenizer: ``"byte"`` or a folder / file for :func:`load_tokenizer` (default the task's).
    search_paths: gin search paths for ``include``s of ``gin_files``.

  Raises:
    RunConfigError: bad configuration; FileNotFoundError: no config.gin or no checkpoint (of
    ``step``); ValueError: the configured model does not match the checkpoint.
  """
  from flax import nnx  # Late: parsing and error reporting stay fast.

  from lclm.model import DecoderLM
  from lclm.training import restore

  files = list(gin_files)
  if not files:
    own = os.path.join(workdir, "config.gin")
    if not os.path.exists(own):
      raise FileNotFoundError(f"{workdir} has no config.gin; is it a training run directory "
                              "(experiments.train --workdir=...) or a converted checkpoint "
                              "(experiments.convert_hf)? Or pass its gin files.")
    files = [own]
  parse_config(files, gin_params, search_paths=search_paths)
  task = build_task(workdir)
  at_step, model = restore.restore_params(
      workdir, lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)), step=step)
  model.eval()
  converted = isinstance(task, ConvertedModel)
  return LoadedModel(model=model, vocab_size=task.vocab_size,
                     tokenizer=tokenizer_for(task, tokenizer), task=None if converted else task,
                     step=at_step, source=workdir, kind="converted" if converted else "run")


def load_hf(path: str, *, dtype: Any = None, tokenizer: str | None = None,
            **decoder_options) -> LoadedModel:
  """A Hugging Face folder imported with :func:`lclm.hf.load_pretrained` (``decoder_options``
  override the converted options, e.g. ``position_options`` for YaRN)."""
  from lclm import hf

  model = hf.load_pretrained(path, dtype=dtype, **decoder_options)
  model.eval()
  vocab_size = int(hf.read_config(path)["vocab_size"])
  tok = tokenizer_lib.load_tokenizer(tokenizer) if tokenizer else _folder_tokenizer(path)
  return LoadedModel(model=model, vocab_size=vocab_size, tokenizer=tok, task=None, step=None,
                     source=path, kind="hf")


def load_model(path: str, *, step: int | None = None, gin_files: Sequence[str] = (),
               gin_params: Sequence[str] = (), tokenizer: str | None = None,
               search_paths: Sequence[str] = ()) -> LoadedModel:
  """:func:`load_hf` for a Hugging Face folder, else :func:`load_run`."""
  if is_hf_folder(path):
    if step is not None or gin_files or gin_params:
      raise RunConfigError(f"{path} is a Hugging Face folder: step, gin files and gin "
                           "bindings apply to lclm run directories only (convert it with "
                           "experiments.convert_hf to evaluate it with other options).")
    return load_hf(path, tokenizer=tokenizer)
  return load_run(path, gin_files=gin_files, gin_params=gin_params, step=step,
                  tokenizer=tokenizer, search_paths=search_paths)


__all__ = ["ConvertedModel", "LoadedModel", "RunConfigError", "build_task", "is_hf_folder",
           "load_hf", "load_model", "load_run", "parse_config", "tokenizer_for"]
