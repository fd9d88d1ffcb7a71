"""What each flash-attention backend provides, as one explicit spec that ``ops.py`` reads.

Backends (``xla.py``, ``tpu.py``, ``gpu.py`` (Triton), ``mosaic_gpu.py`` (Hopper)) share one
call interface::

  flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale, mask, logits_soft_cap,
                q_offset, kv_len, block_q, block_k, interpret, [q_len], [out_dtype])
  flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, ..., d_lse,
                 [q_len], [grad_dtype])

but differ in the layout and padding they take; a :class:`BackendSpec` says how:

* ``layout="bhtd"``: q [B, H, Tq, Dp], k/v [B, Hkv, Tk, Dp], lengths padded to whole blocks
  and head_dim to ``padded_head_dim(D)`` by the caller (``xla.py``, ``tpu.py``);
* ``layout="bthd"``: the user's q [B, Tq, H, D], k/v [B, Tk, Hkv, D] as they are: no padded
  or transposed copies; the kernels mask length tails and head_dim padding themselves
  (``gpu.py``, ``mosaic_gpu.py``). Segment ids are [B, T] in both layouts; lse is [B, H, Tq] in both.

Specs are built at call time (importing a backend pulls in its Pallas lowering).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from types import ModuleType

from pallas_kernels._common import dispatch

LAYOUTS = ("bhtd", "bthd")
BLOCK_NAMES = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")


def _identity(head_dim: int) -> int:
  return head_dim


@dataclasses.dataclass(frozen=True, eq=False)
class BackendSpec:
  """Static facts of one flash-attention backend.

  Attributes:
    name: "xla", "tpu", "gpu" (Triton) or "mosaic_gpu" (Hopper).
    module: the backend module (``flash_forward``, ``flash_backward``).
    min_block: every block size must be a multiple of it.
    default_block_sizes: {block_q, block_k, block_q_bwd, block_k_bwd} defaults.
    power_of_two_blocks: block sizes must be powers of two (Triton tiles).
    default_block_size: ``f(mask, q_len, kv_len) -> int`` picking one square default from
      the mask when the caller gives no block size, or None (use ``default_block_sizes``).
    padded_head_dim: head_dim the caller pads to in HBM (identity for ``"bthd"``).
    layout: ``"bhtd"`` (padded, transposed inputs) or ``"bthd"`` (the user's arrays).
    takes_q_len: flash_forward/backward take ``q_len=`` (the true query length, so query
      blocks made only of padding visit nothing).
    takes_partial_dtypes: flash_forward takes ``out_dtype=`` and flash_backward
      ``grad_dtype=`` (float32 partials for ring attention's merge).
  """
  name: str
  module: ModuleType
  min_block: int
  default_block_sizes: Mapping[str, int]
  power_of_two_blocks: bool
  default_block_size: Callable | None
  padded_head_dim: Callable[[int], int]
  layout: str
  takes_q_len: bool
  takes_partial_dtypes: bool

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"BackendSpec: layout must be one of {LAYOUTS}, got {self.layout!r}.")
    if set(self.default_block_sizes) != set(BLOCK_NAMES):
      raise ValueError(f"BackendSpec: default_block_sizes must have the keys {BLOCK_NAMES}, "
                       f"got {sorted(self.default_block_sizes)}.")

  def forward_kwargs(self, *, q_len: int, out_dtype=None) -> dict:
    """The optional keywords of ``flash_forward`` this backend takes."""
    return self._kwargs(q_len, "out_dtype", out_dtype, "partials")

  def backward_kwargs(self, *, q_len: int, grad_dtype=None) -> dict:
    """The optional keywords of ``flash_backward`` this backend takes."""
    return self._kwargs(q_len, "grad_dtype", grad_dtype, "gradients")

  def _kwargs(self, q_len: int, dtype_name: str, dtype, what: str) -> dict:
    kw = {"q_len": q_len} if self.takes_q_len else {}
    if dtype is not None:
      if not self.takes_partial_dtypes:
        raise ValueError(f"flash_attention ({self.name}): this backend cannot return "
                         f"{dtype_name}={dtype} {what}.")
      kw[dtype_name] = dtype
    return kw


def _xla_spec() -> BackendSpec:
  from pallas_kernels.flash_attention import xla
  return BackendSpec(
      name="xla", module=xla, min_block=xla.MIN_BLOCK,
      default_block_sizes=dict(xla.DEFAULT_BLOCK_SIZES), power_of_two_blocks=False,
      default_block_size=xla.default_block_size, padded_head_dim=_identity, layout="bhtd",
      takes_q_len=True, takes_partial_dtypes=True)


def _tpu_spec() -> BackendSpec:
  # tpu.py is maintained separately: its constants are read here, explicitly.
  from pallas_kernels.flash_attention import tpu
  return BackendSpec(
      name="tpu", module=tpu, min_block=tpu.MIN_BLOCK,
      default_block_sizes=dict(tpu.DEFAULT_BLOCK_SIZES), power_of_two_blocks=False,
      default_block_size=None, padded_head_dim=tpu.padded_head_dim, layout="bhtd",
      takes_q_len=True, takes_partial_dtypes=True)


def _gpu_spec() -> BackendSpec:
  from pallas_kernels.flash_attention import gpu
  return BackendSpec(
      name="gpu", module=gpu, min_block=gpu.MIN_BLOCK,
      default_block_sizes=dict(gpu.DEFAULT_BLOCK_SIZES),
      power_of_two_blocks=gpu.POWER_OF_TWO_BLOCKS,
      default_block_size=None, padded_head_dim=_identity, layout="bthd",
      takes_q_len=False, takes_partial_dtypes=True)


def _mosaic_gpu_spec() -> BackendSpec:
  from pallas_kernels.flash_attention import mosaic_gpu
  return BackendSpec(
      name="mosaic_gpu", module=mosaic_gpu, min_block=mosaic_gpu.MIN_BLOCK,
      default_block_sizes=dict(mosaic_gpu.DEFAULT_BLOCK_SIZES),
      power_of_two_blocks=mosaic_gpu.POWER_OF_TWO_BLOCKS,
      default_block_size=None, padded_head_dim=_identity, layout="bthd",
      takes_q_len=False, takes_partial_dtypes=False)


_BUILDERS = {"xla": _xla_spec, "tpu": _tpu_spec, "gpu": _gpu_spec,
             "mosaic_gpu": _mosaic_gpu_spec}


@functools.lru_cache(maxsize=None)
def backend_spec(name: str) -> BackendSpec:
  """The :class:`BackendSpec` of backend ``name`` ("xla", "tpu", "gpu" or "mosaic_gpu")."""
  if name not in _BUILDERS:
    raise ValueError(f"flash_attention: backend must be one of {tuple(_BUILDERS)}, "
                     f"got {name!r}.")
  return _BUILDERS[name]()
