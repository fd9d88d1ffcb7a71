"""Hugging Face checkpoint folders on disk: ``config.json`` and safetensors, read without torch.

A folder holds ``config.json`` and either ``model.safetensors`` or the shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file). Tensors are read
lazily, one at a time, through the ``safetensors`` library (its flax backend: bfloat16 stays
bfloat16) into host memory.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: str) -> dict[str, Any]:
  """The ``config.json`` of the folder ``path`` as a dict."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory; a Hugging Face checkpoint is a folder "
                            f"with {CONFIG_FILE} and safetensors files.")
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path!r} has no {CONFIG_FILE}; it is not a Hugging Face "
                            "checkpoint folder.")
  try:
    with open(file) as f:
      config = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{file} is not valid JSON: {error}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}.")
  return config


class TensorReader(Mapping[str, np.ndarray]):
  """The tensors of a checkpoint folder, by name, read on access (host memory).

  ``reader[name]`` returns a numpy array (``ml_dtypes.bfloat16`` for BF16 tensors) and
  records ``name`` as used; :meth:`unused` lists the names never read, so that a loader can
  refuse a checkpoint with tensors it does not understand.
  """

  def __init__(self, path: str):
    self.path = path
    index_file = os.path.join(path, INDEX_FILE)
    single_file = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index_file):
      with open(index_file) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
          raise ValueError(f"{index_file} is not a safetensors index (a JSON object with a "
                           f"'weight_map'): {error!r}") from None
      self._files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    elif os.path.isfile(single_file):
      self._files = {name: single_file for name in _keys_of(single_file)}
    else:
      raise FileNotFoundError(f"{path!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (only "
                              "safetensors checkpoints are read; convert .bin files first).")
    missing = sorted({f for f in self._files.values() if not os.path.isfile(f)})
    if missing:
      raise FileNotFoundError(f"{path!r}: the index names shard(s) that do not exist: {missing}.")
    self.used: set[str] = set()

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._files:
      raise KeyError(f"the checkpoint in {self.path!r} has no tensor {name!r}")
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    with jax.default_device(jax.devices("cpu")[0]):
      try:
        with safe_open(self._files[name], framework="flax") as f:
          array = np.asarray(f.get_tensor(name))
      except Exception as error:  # safetensors raises its own error types for corrupt files.
        raise ValueError(f"cannot read tensor {name!r} from {self._files[name]}: {error}"
                         ) from error
    self.used.add(name)
    return array

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)

  def unused(self) -> list[str]:
    return sorted(set(self._files) - self.used)


def _keys_of(file: str) -> list[str]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  try:
    with safe_open(file, framework="flax") as f:
      return list(f.keys())
  except Exception as error:
    raise ValueError(f"{file} is not a readable safetensors file: {error}") from error


def write_checkpoint(path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                     *, max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """Writes ``config.json`` and the tensors (sharded above ``max_shard_bytes``) to ``path``."""
  import safetensors.flax  # pylint: disable=import-outside-toplevel

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  for stale in (SINGLE_FILE, INDEX_FILE):
    if os.path.exists(os.path.join(path, stale)):
      os.remove(os.path.join(path, stale))
  metadata = {"format": "pt"}  # transformers expects it.
  with jax.default_device(jax.devices("cpu")[0]):
    if len(shards) == 1:
      safetensors.flax.save_file(_as_jax(shards[0]), os.path.join(path, SINGLE_FILE),
                                 metadata=metadata)
      return
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors.flax.save_file(_as_jax(shard), os.path.join(path, file), metadata=metadata)
      weight_map.update({name: file for name in shard})
  total = sum(np.asarray(a).nbytes for a in tensors.values())
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _as_jax(tensors):
  return {name: jax.numpy.asarray(array) for name, array in tensors.items()}
