"""Model FLOPs of a :class:`lclm.model.DecoderLM` and model FLOP utilisation (MFU).

Model FLOPs count the arithmetic the model needs, not what an implementation happens to run
(no rematerialisation, no padding of blocks, no masked-out tiles): 2 FLOPs per
multiply-add, per token, at a sequence length ``seq_len``:

* ``matmul``: the mixers' dense projections, from the parameter shapes of their
  ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` modules (2 x kernel size per
  token), plus what a mixer reports under "matmul" (projections kept as raw arrays, or
  applied more than once per token);
* ``conv``: short depthwise convolutions (``layers.ShortConv``: 2 x kernel size per token)
  and what mixers report under "conv";
* ``attention`` / ``recurrent``: each mixer's sequence-mixing core beyond its projections,
  which the mixer reports itself: ``mixer.core_flops_per_token(seq_len)`` returns a dict of
  forward FLOPs per token by part (e.g. ``{"attention": ...}``; see the layers). A mixer
  without the method counts 0, with a one-time warning naming it;
* ``mlp``: gated MLPs from their kernels; a mixture of experts counts its router and
  ``num_experts_per_token`` experts;
* ``output``: the output projection, features x vocab (the embedding lookup is free).

Norms, activations, gates and other elementwise work are not counted. Training FLOPs are
3 x forward (the backward pass costs two forwards). Packed rows are counted as one sequence
of ``seq_len`` (attention within segments costs less: an upper bound for packed data).
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import jax
import numpy as np
from flax import nnx

import layers

PARTS = ("matmul", "attention", "recurrent", "conv", "mlp", "output")

# Peak dense bfloat16 FLOP/s per device (vendor spec sheets; dense, no sparsity), by a
# lower-case substring of ``jax.devices()[0].device_kind``. First match wins: specific
# names before their prefixes ("tpu v5 lite" before "tpu v5").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),   # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),        # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),   # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),          # SXM
    ("h200", 989e12),
    ("a100", 312e12),
)

_WARNED: set[str] = set()
_DENSE_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of one device of this kind (default: ``jax.devices()[0]``);
  None for a device not in :data:`PEAK_BF16_FLOPS` (CPUs, unknown accelerators)."""
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  kind = str(device_kind).lower()
  for pattern, peak in PEAK_BF16_FLOPS:
    if pattern in kind:
      return peak
  return None


def _size(variable) -> int:
  return int(math.prod(variable.get_value().shape))


def _modules(module):
  """The module and its submodules (each once)."""
  return [m for _, m in nnx.iter_modules(module)]


def _dense_flops(module) -> tuple[float, float]:
  """(projection, conv) forward FLOPs per token of the dense and short-conv modules in
  ``module``: 2 x kernel size each."""
  dense = conv = 0.0
  for m in _modules(module):
    if isinstance(m, _DENSE_MODULES):
      dense += 2.0 * _size(m.kernel)
    elif isinstance(m, layers.ShortConv):
      conv += 2.0 * _size(m.kernel)
  return dense, conv


def _mlp_flops(mlp) -> float:
  if mlp is None:
    return 0.0
  if isinstance(mlp, layers.MoEMLP):
    per_expert = sum(_size(p) for p in (mlp.gate, mlp.up, mlp.down)) / mlp.num_experts
    return 2.0 * (_size(mlp.router.kernel) + mlp.num_experts_per_token * per_expert)
  return _dense_flops(mlp)[0]


def mixer_core_flops(mixer, seq_len: int) -> dict[str, float]:
  """The mixer's own report of its core's forward FLOPs per token (a dict by part; a plain
  number counts as "recurrent"); {} with a one-time warning for a mixer without
  ``core_flops_per_token``."""
  report = getattr(mixer, "core_flops_per_token", None)
  if report is None:
    name = type(mixer).__name__
    if name not in _WARNED:
      _WARNED.add(name)
      warnings.warn(f"flops: mixer {name} has no core_flops_per_token(seq_len); its "
                    "sequence-mixing core counts as 0 FLOPs (the MFU is underestimated).",
                    stacklevel=2)
    return {}
  parts = report(seq_len)
  if not isinstance(parts, Mapping):
    parts = {"recurrent": parts}
  return {k: float(v) for k, v in parts.items()}


def forward_flops_per_token(model, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token of ``model`` (a DecoderLM) at ``seq_len``, by part (the keys
  of :data:`PARTS`, plus any other part a mixer reports) and "total"."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"flops: seq_len must be a positive int, got {seq_len!r}.")
  seq_len = int(seq_len)
  parts = dict.fromkeys(PARTS, 0.0)

  def add(name, value):
    parts[name] = parts.get(name, 0.0) + float(value)

  for block in model.layer_blocks():
    dense, conv = _dense_flops(block.mixer)
    add("matmul", dense)
    add("conv", conv)
    for name, value in mixer_core_flops(block.mixer, seq_len).items():
      add(name, value)
    if block.short_conv is not None:
      add("conv", 2.0 * _size(block.short_conv.kernel))
    add("mlp", _mlp_flops(block.mlp))
  add("output", 2.0 * model.features * model.vocab_size)
  parts["total"] = sum(parts.values())
  return parts


def model_flops_per_token(model, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token (forward + backward = 3 x forward) of ``model`` at
  ``seq_len``, by part and "total"; see :func:`forward_flops_per_token`."""
  return {k: 3.0 * v for k, v in forward_flops_per_token(model, seq_len).items()}


def mfu(flops_per_token: float, tokens_per_second_per_device: float,
        peak_flops: float | None) -> float | None:
  """Model FLOP utilisation: achieved model FLOP/s per device over the device's peak; None
  when the peak is unknown."""
  if peak_flops is None or peak_flops <= 0:
    return None
  return flops_per_token * tokens_per_second_per_device / peak_flops


def describe(flops: Mapping[str, float]) -> str:
  """A one-line breakdown, e.g. ``"model FLOPs/token (train) 1.23e+06: matmul 40.1%, ..."``."""
  total = flops.get("total", 0.0)
  shares = ", ".join(f"{k} {v:.3g} ({100 * v / total:.1f}%)" if total else f"{k} {v:.3g}"
                     for k, v in flops.items() if k != "total" and v)
  return f"model FLOPs per training token {total:.4g}: {shares}"
