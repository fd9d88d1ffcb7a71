"""Hugging Face checkpoint folders on disk: ``config.json`` and safetensors, read without torch.

A folder holds ``config.json`` and either ``model.safetensors`` or the shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file). Tensors are
memory-mapped, one at a time, as numpy arrays (bfloat16 stays bfloat16, as
``ml_dtypes.bfloat16``); files are written with the ``safetensors`` library.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterator, Mapping

import ml_dtypes
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


# The safetensors dtypes lclm reads (the format's names) as numpy dtypes.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_header(file: str) -> dict[str, dict[str, Any]]:
  """The tensor entries of a safetensors file's header: name -> {dtype, shape,
  data_offsets}, checked against the file's size. (The format is an 8-byte little-endian
  header length, a JSON header and the tensors' bytes; the ``safetensors`` library's numpy
  reader does not take bfloat16, so lclm reads the header itself and maps the data.)"""
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{file} is not a safetensors file (shorter than its header length).")
    length = struct.unpack("<Q", raw)[0]
    if length > size - 8:
      raise ValueError(f"{file} is not a readable safetensors file: its header claims "
                       f"{length} bytes, the file has {size}.")
    try:
      header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise ValueError(f"{file} is not a readable safetensors file: bad header ({error}).") from None
  header.pop("__metadata__", None)
  data_size = size - 8 - length
  for name, entry in header.items():
    begin, stop = entry["data_offsets"]
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which lclm does "
                       f"not read ({sorted(_DTYPES)}).")
    expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(
        _DTYPES[entry["dtype"]]).itemsize
    if not 0 <= begin <= stop <= data_size or stop - begin != expected:
      raise ValueError(f"{file} is not a readable safetensors file (truncated?): tensor "
                       f"{name!r} lies at bytes {begin}..{stop} of {data_size}.")
    entry["data_start"] = 8 + length + begin
  return header


class TensorReader(Mapping[str, np.ndarray]):
  """The tensors of a checkpoint folder, by name, read on access (memory-mapped host arrays).

  ``reader[name]`` returns a read-only numpy array (``ml_dtypes.bfloat16`` for BF16
  tensors) and records ``name`` as used; :meth:`unused` lists the names never read, so that
  a loader can refuse a checkpoint with tensors it does not understand. ``name in reader``
  reads nothing.
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
      files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    elif os.path.isfile(single_file):
      files = {name: single_file for name in read_header(single_file)}
    else:
      raise FileNotFoundError(f"{path!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (only "
                              "safetensors checkpoints are read; convert .bin files first).")
    missing = sorted({f for f in files.values() if not os.path.isfile(f)})
    if missing:
      raise FileNotFoundError(f"{path!r}: the index names shard(s) that do not exist: {missing}.")
    self._files = files
    self._headers: dict[str, dict] = {}
    self.used: set[str] = set()

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._files:
      raise KeyError(f"the checkpoint in {self.path!r} has no tensor {name!r}")
    file = self._files[name]
    if file not in self._headers:
      self._headers[file] = read_header(file)
    entry = self._headers[file].get(name)
    if entry is None:
      raise ValueError(f"{file} has no tensor {name!r}, which the index places there.")
    array = np.memmap(file, dtype=_DTYPES[entry["dtype"]], mode="r",
                      offset=entry["data_start"], shape=tuple(entry["shape"]))
    self.used.add(name)
    return array

  def __contains__(self, name: object) -> bool:
    return name in self._files

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)

  def unused(self) -> list[str]:
    return sorted(set(self._files) - self.used)


def write_checkpoint(path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                     *, max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """Writes ``config.json`` and the tensors (sharded above ``max_shard_bytes``) to ``path``."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel

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
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(path, file), metadata=metadata)
    weight_map.update({name: file for name in shard})
  total = sum(np.asarray(a).nbytes for a in tensors.values())
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
