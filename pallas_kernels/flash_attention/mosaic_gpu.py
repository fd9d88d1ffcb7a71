"""Mosaic-GPU (Hopper, sm90) flash attention: FlashAttention-3 style forward and backward.

Same module interface as ``gpu.py`` (Triton): ``flash_forward`` / ``flash_backward`` with the
same arguments (without gpu.py's ``out_dtype`` / ``grad_dtype``), on the same layout.

Layouts: the user's arrays, q [B, Tq, H, D]; k, v [B, Tk, Hkv, D] with H % Hkv == 0; query
head h reads kv head h // (H // Hkv) by a strided TMA box of its rows (K/V are never repeated
or transposed in memory). lse [B, H, Tq] float32 (natural log); the backward's row statistics
(base-2 lse, delta) are [B, H, Tq] rows, never lane-replicated. The kernels tile whole blocks
of rows and Dp = 64 or 128 columns (:func:`padded_head_dim`): lengths that are not multiples of
the blocks, or head dims other than 64 / 128, are zero-padded here (a copy only for those
sizes; padded keys are masked with ``kv_len``, padded query rows get lse2 = +inf in the
backward so they contribute nothing, and everything is sliced back).

Supported: float16 / bfloat16 inputs (Hopper warpgroup MMA takes 16-bit operands; accumulation,
softmax statistics and gradients are float32), head dims 64 and 128 (others padded up to them;
> 128 refused), ``FullMask`` and ``CausalMask(shift)`` (any shift, with end-aligned queries via
``q_offset``), GQA/MQA, ``kv_len`` padding, fully masked rows (out 0, lse -inf, zero grads).
Refused with a ``ValueError`` (:func:`unsupported_reason` says why; ``ops.py`` then falls back
to Triton): segment ids, windows, sinks, chunks, global tokens, unions and per-head masks.
Logits soft cap (``cap * tanh(scale * s / cap)``) is supported, forward and backward.

Kernels (``plgpu.kernel``; each CTA runs 3 warpgroups: 2 compute + 1 memory producer):
  forward  grid (q tile, H, B): each compute warpgroup owns one block_q-row query block (a tile
           is 2 blocks), holds Q in shared memory and loops over the key blocks it can see;
           the producer warpgroup streams K/V blocks by TMA into a ring of ``NUM_STAGES``
           shared-memory slots (per-slot "loaded" barriers, "consumed" barriers the compute
           warpgroups arrive on). S = Q Kᵀ and O += P V are warpgroup MMAs (wgmma) with float32
           accumulators; the softmax runs in base 2 (``exp2``) in registers.
  dQ       grid (q tile, H, B): like the forward; Q, dO, lse, delta stay in shared memory and
           K/V stream; dQ += dS K.
  dK/dV    grid (kv tile, Hkv, B): each compute warpgroup owns one key block (K, V resident);
           the producer streams (Q, dO, lse, delta) over the query heads of the group and the
           query blocks that can see the key block, so dK and dV come out summed over the GQA
           group with no extra pass. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ are computed directly (no tile
           transposes); dV += Pᵀ dO, dK += dSᵀ Q.
Block skipping: a compute warpgroup visits only the blocks its mask reaches, computed in-kernel
from the block index (no metadata array); wholly visible blocks build no in-tile mask, only the
causal diagonal and the kv_len edge do. The two warpgroups of a CTA may visit different
ranges: the producer loads their union and a warpgroup releases the steps outside its own
range (observes their loads, arrives on the consumed barrier).

``interpret=True`` runs the kernels in jax's Mosaic-GPU interpreter on CPU: it simulates the
warpgroups as threads, shared memory, TMA copies and barriers (and checks that every barrier
phase is observed), so the pipeline, the block ranges and the math are tested. What only the
hardware path has is replaced there by its plain-jax meaning: the matmuls are ``dot_general``
with float32 accumulation (the interpreter's wgmma takes neither register operands nor
transposed views, and has no ``run_state``), and register layouts (``layout_cast``,
layout-typed ``iota``/``load``) are dropped. ``jax.export`` lowering tests cover that path.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import masks as masks_lib
from pallas_kernels.flash_attention.common import LN2, LOG2E, attention_delta

MIN_BLOCK = 64
POWER_OF_TWO_BLOCKS = False
DEFAULT_BLOCK_SIZES = dict(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Hopper only: warpgroup MMA (wgmma) is an sm_90a instruction; Blackwell (sm_100+) replaced it
# with tcgen05 MMAs into tensor memory, which these kernels do not use.
SUPPORTED_COMPUTE_CAPABILITY_MAJOR = 9
NUM_STAGES = 2  # Ring slots of streamed blocks.
COMPUTE_WGS = 2  # Compute warpgroups per CTA (plus one memory warpgroup).
SMEM_BYTES = 227 * 1024  # Shared memory a Hopper CTA may use.

_STATIC = ("scale", "mask", "logits_soft_cap", "q_offset", "kv_len", "block_q", "block_k",
           "interpret")


def padded_head_dim(head_dim: int) -> int:
  """Head dim the kernels tile: 64 or 128 (128-byte swizzled rows of 16-bit elements)."""
  for d in HEAD_DIMS:
    if head_dim <= d:
      return d
  raise ValueError(f"flash_attention (mosaic_gpu): head_dim must be at most {HEAD_DIMS[-1]}, "
                   f"got {head_dim}; head dims {HEAD_DIMS} are tiled (smaller ones are padded).")


_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def is_supported_device(device=None) -> bool:
  """Whether ``device`` is a Hopper GPU (sm90: H100, H200, ...), the target of these kernels.

  ``device``: a ``jax.Device`` (default: the first jax device) or an abstract device (as in
  ``dispatch.target_platform("gpu", device_kind=...)``), judged by its compute capability
  when it has one, else by its ``device_kind`` name.
  """
  device = jax.devices()[0] if device is None else device
  if str(getattr(device, "platform", "gpu")).lower() not in ("gpu", "cuda"):
    return False
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return int(str(capability).split(".")[0]) == SUPPORTED_COMPUTE_CAPABILITY_MAJOR
  kind = str(getattr(device, "device_kind", "")).upper()
  return any(f"{name} " in f"{kind} " or f"{name}-" in kind for name in _HOPPER_KINDS)


def unsupported_reason(*, mask, logits_soft_cap=None, has_segments=False, dtype=None,
                       head_dim=None) -> str | None:
  """Why these kernels cannot run a call (a sentence), or None when they can.

  ``ops.py`` uses this to fall back to the Triton kernels for what is not supported yet.
  ``logits_soft_cap`` is accepted for symmetry: every soft cap is supported.
  """
  del logits_soft_cap
  if has_segments:
    return "segment ids are not supported"
  if not isinstance(mask, (masks_lib.FullMask, masks_lib.CausalMask)):
    return (f"only full and causal masks are supported, got {type(mask).__name__} (windows, "
            "sinks, chunks, global tokens, combinations and per-head masks are not)")
  if dtype is not None and jnp.dtype(dtype) not in DTYPES:
    return f"only bfloat16 and float16 inputs are supported, got {jnp.dtype(dtype).name}"
  if head_dim is not None and head_dim > HEAD_DIMS[-1]:
    return f"head_dim must be at most {HEAD_DIMS[-1]}, got {head_dim}"
  return None


# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call that every kernel body needs."""
  scale: float
  soft_cap: float | None
  diag: int | None  # Causal: key k is visible from query row r iff k <= r + diag. None: full.
  kv_len: int
  block_q: int
  block_k: int
  nq: int  # query blocks
  nk: int  # key blocks
  group: int  # query heads per kv head
  head_dim: int
  dtype: jnp.dtype
  interpret: bool


def _rows(ref, b, h, start, size):
  """[size, Dp] rows ``start`` ... of (batch b, head h) of a [B, T, H, Dp] ref (a strided TMA
  box: heads are read in place, never transposed into a copy)."""
  return ref.at[b, pl.ds(start, size), h]


def _zeros(plan, shape, layout, value=0.0):
  x = jnp.full(shape, value, jnp.float32)
  return x if plan.interpret else plgpu.layout_cast(x, layout)


def _iota(plan, shape, dim):
  if plan.interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


_LOAD_INDEX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_TAKES_INDEX = _LOAD_INDEX is not None and _LOAD_INDEX.default is inspect.Parameter.empty


def _load_stat(plan, ref, dim):
  """A float32 row-statistics block from shared memory, laid out to broadcast along ``dim``."""
  if plan.interpret:
    return ref[...]
  layout = plgpu.Layout.WGMMA.reduce(dim)
  if _LOAD_TAKES_INDEX:  # jax 0.10: load(ref, idx, layout=...); later: load(ref, layout=...)
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _mma(plan, shape, a, b, transpose_b=False):
  """a @ b (a @ bᵀ with ``transpose_b``) into a fresh float32 accumulator of ``shape``.

  ``a`` is a shared-memory ref or a 16-bit register value, ``b`` a shared-memory ref; on
  hardware one warpgroup MMA (a transposed ``b`` is a transposed view, no data movement).
  """
  if plan.interpret:  # The interpreter's wgmma takes neither register operands nor views.
    return _dot(a, b, transpose_b)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b.transpose((1, 0)) if transpose_b else b)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mma_acc(plan, acc, a, b):
  """acc + a @ b, accumulated in place in the MMA accumulator registers on hardware."""
  if plan.interpret:  # The interpreter has no run_state.
    return acc + _dot(a, b, False)
  return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def _dot(a, b, transpose_b):
  """Interpret-mode stand-in for a warpgroup MMA: 16-bit operands, float32 accumulation."""
  a = a if isinstance(a, jax.Array) else a[...]
  return lax.dot_general(a, b[...], (((1,), (1 if transpose_b else 0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _logits(plan, s):
  """Base-2 logits from raw scores s = q·k (float32), and tanh(s * scale / cap) (None without a
  soft cap) for the soft-cap gradient: logits = cap * tanh(scale * s / cap) * log2(e)."""
  if plan.soft_cap is None:
    return s * (plan.scale * LOG2E), None
  t = jnp.tanh(s * (plan.scale / plan.soft_cap))
  return t * (plan.soft_cap * LOG2E), t


def _bcast(x, shape, dim):
  """Broadcasts a row statistic [n] along the other axis of a 2-D tile."""
  return lax.broadcast_in_dim(x, shape, [dim])


def _visible(plan, shape, q_start, k_start, keys_on_rows):
  """Bool tile: which (query, key) pairs of a tile are visible (causal and ``kv_len``)."""
  q = _iota(plan, shape, 1 if keys_on_rows else 0) + q_start
  k = _iota(plan, shape, 0 if keys_on_rows else 1) + k_start
  visible = k < plan.kv_len
  if plan.diag is not None:
    visible = jnp.logical_and(visible, k <= q + plan.diag)
  return visible


def _i32(x):
  return jnp.asarray(x, jnp.int32)


def _clamp(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _key_range(plan, i, valid):
  """Key blocks query block ``i`` visits: (lo, a, b, hi) = masked [lo, a), unmasked [a, b),
  masked [b, hi). An invalid block (past the last) visits nothing: (0, 0, 0, 0)."""
  bq, bk, zero = plan.block_q, plan.block_k, _i32(0)
  if plan.diag is None:
    hi, full = _i32(-(-plan.kv_len // bk)), _i32(plan.kv_len // bk)
  else:
    # Keys the last / first row of the block sees: k <= row + diag, k < kv_len.
    last = jnp.minimum(i * bq + (bq - 1 + plan.diag + 1), plan.kv_len)
    first = jnp.minimum(i * bq + (plan.diag + 1), plan.kv_len)
    hi = _clamp(lax.div(jnp.maximum(last, 0) + (bk - 1), _i32(bk)), 0, plan.nk)
    full = _clamp(lax.div(jnp.maximum(first, 0), _i32(bk)), 0, hi)
  hi = jnp.where(valid, hi, zero)
  full = jnp.where(valid, full, zero)
  return zero, zero, full, hi


def _query_range(plan, j, valid):
  """Query blocks that can see key block ``j``, as in :func:`_key_range`. A key block of
  padding only (or past the last) visits nothing: (nq, nq, nq, nq)."""
  bq, bk, nq = plan.block_q, plan.block_k, _i32(plan.nq)
  valid = jnp.logical_and(valid, j * bk < plan.kv_len)
  whole = (j + 1) * bk <= plan.kv_len  # No padding key in the block.
  if plan.diag is None:
    lo, full_lo = _i32(0), jnp.where(whole, _i32(0), nq)
  else:
    # Query row r sees key k iff r >= k - diag.
    lo = jnp.minimum(lax.div(jnp.maximum(j * bk - plan.diag, 0), _i32(bq)), nq)
    first_full = lax.div(jnp.maximum((j + 1) * bk - 1 - plan.diag, 0) + (bq - 1), _i32(bq))
    full_lo = jnp.where(whole, _clamp(first_full, lo, nq), nq)
  lo = jnp.where(valid, lo, nq)
  full_lo = jnp.where(valid, full_lo, nq)
  return lo, full_lo, nq, nq


def _sweep(lo_cta, hi_cta, rng, step, flush, carry):
  """One compute warpgroup's pass over the producer's steps [lo_cta, hi_cta).

  ``rng`` = (lo, a, b, hi) within [lo_cta, hi_cta]: ``step(i, carry, masked)`` runs on
  [lo, a) masked, [a, b) unmasked, [b, hi) masked; ``flush(i)`` releases the other steps.
  """
  lo, a, b, hi = rng

  def released(i, c):
    flush(i)
    return c

  carry = lax.fori_loop(lo_cta, lo, released, carry)
  carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)
  return lax.fori_loop(hi, hi_cta, released, carry)


def _release(slot, loaded, consumed):
  """A compute warpgroup skips a producer step outside its range: it observes the step's
  loads (every barrier phase is observed by every warpgroup that uses the barrier) and
  releases the slot."""
  for barrier in loaded:
    plgpu.barrier_wait(barrier.at[slot])
  plgpu.barrier_arrive(consumed.at[slot])


def _produce(total, stages, consumed, load):
  """The memory warpgroup: ``load(step, slot)`` for steps [0, total) into a ring of slots,
  waiting for the compute warpgroups to release a slot before refilling it."""

  def body(s, _):
    slot = lax.rem(s, _i32(stages))

    @pl.when(s >= stages)
    def _():
      plgpu.barrier_wait(consumed.at[slot])

    load(s, slot)
    return _

  lax.fori_loop(0, total, body, None)

  # Drain: observe the last release of every slot, so that no barrier phase goes unobserved
  # when the barriers are freed (the interpreter checks this; on hardware it costs nothing,
  # the CTA waits for its compute warpgroups anyway).
  def drain(s, _):
    plgpu.barrier_wait(consumed.at[lax.rem(s, _i32(stages))])
    return _

  lax.fori_loop(jnp.maximum(total - stages, 0), total, drain, None)


def _smem(plan, shape, dtype=None):
  """Shared-memory scratch; 16-bit tiles are tiled (8, 64) and 128-byte swizzled for TMA and
  wgmma."""
  dtype = plan.dtype if dtype is None else dtype
  if jnp.dtype(dtype).itemsize == 2 and len(shape) >= 2:
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                                plgpu.SwizzleTransform(128)))
  return plgpu.SMEM(shape, dtype)


def _compiler_params():
  return plgpu.CompilerParams(approx_math=True)


def _interpret_params(interpret):
  if not interpret:
    return None
  params = getattr(plgpu, "InterpretGPUParams", None)  # public from jax 0.11
  if params is None:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
  return params()


def _check(name, q, k, v, *, mask, logits_soft_cap, has_segments, block_q, block_k):
  """Validates a call; raises ValueError naming what is not supported."""
  reason = unsupported_reason(mask=mask, logits_soft_cap=logits_soft_cap,
                              has_segments=has_segments, dtype=q.dtype, head_dim=q.shape[-1])
  if reason:
    raise ValueError(f"flash_attention (mosaic_gpu): {reason}; use the Triton kernels "
                     "(gpu.py) for this call.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"flash_attention (mosaic_gpu): q, k, v must share a dtype, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}.")
  for block_name, block in (("block_q", block_q), ("block_k", block_k)):
    if block <= 0 or block % 64:
      raise ValueError(f"flash_attention (mosaic_gpu): {name} {block_name} must be a positive "
                       f"multiple of 64 (the warpgroup MMA tile), got {block}.")


def _check_smem(name, nbytes):
  if nbytes > SMEM_BYTES:
    raise ValueError(f"flash_attention (mosaic_gpu): the {name} kernel needs {nbytes} bytes of "
                     f"shared memory at these block sizes, more than the {SMEM_BYTES} of a "
                     "Hopper CTA; use smaller block_q / block_k.")


def _plan(q, k, mask, *, scale, soft_cap, q_offset, kv_len, block_q, block_k, interpret):
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1:3]
  diag = None if isinstance(mask, masks_lib.FullMask) else q_offset - mask.shift
  return _Plan(scale=scale, soft_cap=soft_cap, diag=diag, kv_len=kv_len, block_q=block_q,
               block_k=block_k, nq=-(-tq // block_q), nk=-(-tk // block_k), group=h // hkv,
               head_dim=padded_head_dim(d), dtype=jnp.dtype(q.dtype), interpret=interpret)


def _pad(x, length, head_dim):
  """Zero-pads [B, T, H, D] to ``length`` rows and ``head_dim`` columns (no copy if aligned)."""
  pads = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim - x.shape[3]))
  return x if not any(p for _, p in pads) else jnp.pad(x, pads)


def _cta_range(range_fn, plan, tile, num_blocks):
  """The union [lo, hi) of the ranges of a CTA's compute warpgroups (what the producer loads)."""
  ranges = [range_fn(plan, tile * COMPUTE_WGS + w, tile * COMPUTE_WGS + w < num_blocks)
            for w in range(COMPUTE_WGS)]
  return (functools.reduce(jnp.minimum, [r[0] for r in ranges]),
          functools.reduce(jnp.maximum, [r[3] for r in ranges]))


def _own_block(tile, wg, num_blocks):
  """(block index, is it real) of compute warpgroup ``wg`` in CTA ``tile``."""
  block = tile * COMPUTE_WGS + wg
  return block, block < num_blocks


def _compute_prologue(plan):
  if not plan.interpret:  # Registers move from the producer to the compute warpgroups.
    plgpu.set_max_registers(232, action="increase")


def _memory_prologue(plan):
  if not plan.interpret:
    plgpu.set_max_registers(40, action="decrease")


def _load_own(sources, targets, barriers):
  """TMA-loads a compute warpgroup's resident blocks and waits for them."""
  for src, dst, barrier in zip(sources, targets, barriers):
    plgpu.copy_gmem_to_smem(src, dst, barrier)
  for barrier in barriers:
    plgpu.barrier_wait(barrier)


def _store_own(sources, targets):
  """Writes a compute warpgroup's results from shared memory to HBM by TMA."""
  plgpu.commit_smem()
  for src, dst in zip(sources, targets):
    plgpu.copy_smem_to_gmem(src, dst)
  plgpu.wait_smem_to_gmem(0)


def _stream_kv(plan, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, consumed, batch, kv_head,
               lo_cta, hi_cta):
  """Producer of the forward and dQ kernels: K/V blocks [lo_cta, hi_cta) into the ring."""

  def load(s, slot):
    start = (lo_cta + s) * plan.block_k
    for ref, smem, barrier in ((k_ref, k_smem, k_bar), (v_ref, v_smem, v_bar)):
      plgpu.copy_gmem_to_smem(_rows(ref, batch, kv_head, start, plan.block_k),
                              smem.at[slot], barrier.at[slot])

  _produce(hi_cta - lo_cta, NUM_STAGES, consumed, load)


# ----------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem,
                    q_bar, k_bar, v_bar, consumed, *, plan: _Plan):
  bq, bk, d = plan.block_q, plan.block_k, plan.head_dim
  tile, head, batch = lax.axis_index("tile"), lax.axis_index("heads"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  kv_head = lax.div(head, _i32(plan.group))
  lo_cta, hi_cta = _cta_range(_key_range, plan, tile, plan.nq)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    _compute_prologue(plan)
    i, valid = _own_block(tile, wg, plan.nq)
    q_start = i * bq
    q_smem, lse_out = qo_smem.at[wg], lse_smem.at[wg]

    @pl.when(valid)
    def _():
      _load_own([_rows(q_ref, batch, head, q_start, bq)], [q_smem], [q_bar.at[wg]])

    def step(j, carry, masked):
      acc, m, l = carry
      slot = lax.rem(j - lo_cta, _i32(NUM_STAGES))
      plgpu.barrier_wait(k_bar.at[slot])
      s, _ = _logits(plan, _mma(plan, (bq, bk), q_smem, k_smem.at[slot], transpose_b=True))
      if masked:
        visible = _visible(plan, (bq, bk), q_start, j * bk, keys_on_rows=False)
        s = jnp.where(visible, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      # A row with nothing visible yet keeps m = -inf; it exponentiates against 0.
      m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      p = jnp.exp2(s - _bcast(m_shift, s.shape, 0))
      alpha = jnp.exp2(m - m_shift)
      l = alpha * l + p.sum(axis=1)
      acc = acc * _bcast(alpha, acc.shape, 0)
      plgpu.barrier_wait(v_bar.at[slot])
      acc = _mma_acc(plan, acc, p.astype(plan.dtype), v_smem.at[slot])
      plgpu.barrier_arrive(consumed.at[slot])
      return acc, m_new, l

    def flush(j):
      _release(lax.rem(j - lo_cta, _i32(NUM_STAGES)), (k_bar, v_bar), consumed)

    row = plgpu.Layout.WGMMA.reduce(1)
    carry = (_zeros(plan, (bq, d), plgpu.Layout.WGMMA), _zeros(plan, (bq,), row, -jnp.inf),
             _zeros(plan, (bq,), row))
    acc, m, l = _sweep(lo_cta, hi_cta, _key_range(plan, i, valid), step, flush, carry)

    @pl.when(valid)
    def _():
      empty = l == 0.0
      safe_l = jnp.where(empty, 1.0, l)
      q_smem[...] = (acc / _bcast(safe_l, acc.shape, 0)).astype(plan.dtype)
      lse_out[...] = jnp.where(empty, -jnp.inf, m * LN2 + jnp.log(safe_l))
      _store_own([q_smem, lse_out], [_rows(o_ref, batch, head, q_start, bq),
                                     lse_ref.at[batch, head, pl.ds(q_start, bq)]])

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    _memory_prologue(plan)
    _stream_kv(plan, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, consumed, batch, kv_head,
               lo_cta, hi_cta)


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale: float,
                  mask: masks_lib.Mask, logits_soft_cap: float | None, q_offset: int,
                  kv_len: int, block_q: int, block_k: int, interpret: bool = False):
  """Flash-attention forward pass on Hopper (Mosaic GPU), on the user's layout.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D]; bfloat16 or float16; any lengths, D <= 128.
    q_segment_ids, kv_segment_ids: must be None (segments are not supported).
    scale: multiplies the logits, before the soft cap ``cap * tanh(s / cap)``.
    logits_soft_cap: the cap (Gemma 2), or None.
    mask: ``masks.FullMask()`` or ``masks.CausalMask(shift)``.
    q_offset: position of query 0 (true kv_len - true q_len; may be negative).
    kv_len: true number of keys (<= Tk); keys at or past it are never visible.
    block_q: query rows per compute warpgroup (a CTA takes 2 blocks); block_k: keys per
      streamed block. Both multiples of 64.
    interpret: run in jax's Mosaic-GPU interpreter (CPU).

  Returns:
    out [B, Tq, H, D] in q.dtype and lse [B, H, Tq] float32 (natural log-sum-exp of the
    visible logits); a query that sees no key gets out = 0 and lse = -inf.
  """
  _check("forward", q, k, v, mask=mask, logits_soft_cap=logits_soft_cap,
         has_segments=q_segment_ids is not None or kv_segment_ids is not None,
         block_q=block_q, block_k=block_k)
  b, tq, h, d = q.shape
  tk = k.shape[1]
  if 0 in (b, h, tq, d) or tk == 0 or kv_len == 0:
    return jnp.zeros_like(q), jnp.full((b, h, tq), -jnp.inf, jnp.float32)
  plan = _plan(q, k, mask, scale=scale, soft_cap=logits_soft_cap, q_offset=q_offset,
               kv_len=min(kv_len, tk), block_q=block_q, block_k=block_k, interpret=interpret)
  qp, kp, vp = (_pad(x, n * blk, plan.head_dim)
                for x, n, blk in ((q, plan.nq, block_q), (k, plan.nk, block_k),
                                  (v, plan.nk, block_k)))
  out, lse = _forward_call(qp, kp, vp, plan)
  return out[:, :tq, :, :d], lse[:, :, :tq]


def _forward_call(q, k, v, plan: _Plan):
  """The forward kernel on padded [B, T, H, Dp] arrays."""
  b, _, h, dp = q.shape
  block_q, block_k = plan.block_q, plan.block_k
  itemsize = plan.dtype.itemsize
  _check_smem("forward", (COMPUTE_WGS * block_q + 2 * NUM_STAGES * block_k) * dp * itemsize
              + COMPUTE_WGS * block_q * 4)
  scratch = [
      _smem(plan, (COMPUTE_WGS, block_q, dp)),  # Q, then O
      _smem(plan, (NUM_STAGES, block_k, dp)),  # K ring
      _smem(plan, (NUM_STAGES, block_k, dp)),  # V ring
      _smem(plan, (COMPUTE_WGS, block_q), jnp.float32),  # lse
      plgpu.Barrier(num_barriers=COMPUTE_WGS),  # Q loaded
      plgpu.Barrier(num_barriers=NUM_STAGES),  # K loaded
      plgpu.Barrier(num_barriers=NUM_STAGES),  # V loaded
      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=NUM_STAGES),  # slot consumed
  ]
  return plgpu.kernel(
      functools.partial(_forward_kernel, plan=plan),
      out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, h, q.shape[1]), jnp.float32)],
      scratch_types=scratch,
      grid=(-(-plan.nq // COMPUTE_WGS), h, b),
      grid_names=("tile", "heads", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=_interpret_params(plan.interpret),
  )(q, k, v)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2, do_smem2,
               lse_smem2, delta_smem2, k_smem, v_smem, own_bar, k_bar, v_bar, consumed, *,
               plan: _Plan):
  bq, bk, d = plan.block_q, plan.block_k, plan.head_dim
  tile, head, batch = lax.axis_index("tile"), lax.axis_index("heads"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  kv_head = lax.div(head, _i32(plan.group))
  lo_cta, hi_cta = _cta_range(_key_range, plan, tile, plan.nq)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    _compute_prologue(plan)
    i, valid = _own_block(tile, wg, plan.nq)
    q_start = i * bq
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]

    @pl.when(valid)
    def _():
      rows = pl.ds(q_start, bq)
      _load_own([_rows(q_ref, batch, head, q_start, bq),
                 _rows(do_ref, batch, head, q_start, bq),
                 lse_ref.at[batch, head, rows], delta_ref.at[batch, head, rows]],
                [q_smem, do_smem, lse_smem, delta_smem],
                [own_bar.at[n * COMPUTE_WGS + wg] for n in range(4)])

    lse2 = _load_stat(plan, lse_smem, 1)
    delta = _load_stat(plan, delta_smem, 1)

    def step(j, dq, masked):
      slot = lax.rem(j - lo_cta, _i32(NUM_STAGES))
      plgpu.barrier_wait(k_bar.at[slot])
      s, t = _logits(plan, _mma(plan, (bq, bk), q_smem, k_smem.at[slot], transpose_b=True))
      if masked:
        visible = _visible(plan, (bq, bk), q_start, j * bk, keys_on_rows=False)
        s = jnp.where(visible, s, -jnp.inf)
      p = jnp.exp2(s - _bcast(lse2, s.shape, 0))
      plgpu.barrier_wait(v_bar.at[slot])
      dp = _mma(plan, (bq, bk), do_smem, v_smem.at[slot], transpose_b=True)
      ds = p * (dp - _bcast(delta, dp.shape, 0))
      if t is not None:
        ds = ds * (1.0 - t * t)
      dq = _mma_acc(plan, dq, ds.astype(plan.dtype), k_smem.at[slot])
      plgpu.barrier_arrive(consumed.at[slot])
      return dq

    def flush(j):
      _release(lax.rem(j - lo_cta, _i32(NUM_STAGES)), (k_bar, v_bar), consumed)

    dq = _sweep(lo_cta, hi_cta, _key_range(plan, i, valid), step, flush,
                _zeros(plan, (bq, d), plgpu.Layout.WGMMA))

    @pl.when(valid)
    def _():
      q_smem[...] = (dq * plan.scale).astype(plan.dtype)
      _store_own([q_smem], [_rows(dq_ref, batch, head, q_start, bq)])

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    _memory_prologue(plan)
    _stream_kv(plan, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, consumed, batch, kv_head,
               lo_cta, hi_cta)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem2,
                 v_smem2, q_smem, do_smem, lse_smem, delta_smem, own_bar, q_bar, do_bar,
                 lse_bar, delta_bar, consumed, *, plan: _Plan):
  bq, bk, d = plan.block_q, plan.block_k, plan.head_dim
  tile, kv_head, batch = lax.axis_index("tile"), lax.axis_index("heads"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  lo_cta, hi_cta = _cta_range(_query_range, plan, tile, plan.nk)
  per_head = hi_cta - lo_cta  # producer steps per query head of the group
  streamed = (q_bar, lse_bar, do_bar, delta_bar)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    _compute_prologue(plan)
    j, valid = _own_block(tile, wg, plan.nk)
    k_start = j * bk
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    rng = _query_range(plan, j, valid)

    @pl.when(valid)
    def _():
      _load_own([_rows(k_ref, batch, kv_head, k_start, bk),
                 _rows(v_ref, batch, kv_head, k_start, bk)], [k_smem, v_smem],
                [own_bar.at[wg], own_bar.at[COMPUTE_WGS + wg]])

    def head_pass(g, carry):
      base = g * per_head - lo_cta  # producer step of query block i is base + i

      def step(i, carry, masked):
        dk, dv = carry
        slot = lax.rem(base + i, _i32(NUM_STAGES))
        plgpu.barrier_wait(q_bar.at[slot])
        st, t = _logits(plan, _mma(plan, (bk, bq), k_smem, q_smem.at[slot],
                                   transpose_b=True))  # K Qᵀ
        if masked:
          visible = _visible(plan, (bk, bq), i * bq, k_start, keys_on_rows=True)
          st = jnp.where(visible, st, -jnp.inf)
        plgpu.barrier_wait(lse_bar.at[slot])
        pt = jnp.exp2(st - _bcast(_load_stat(plan, lse_smem.at[slot], 0), st.shape, 1))
        plgpu.barrier_wait(do_bar.at[slot])
        dv = _mma_acc(plan, dv, pt.astype(plan.dtype), do_smem.at[slot])  # += Pᵀ dO
        dpt = _mma(plan, (bk, bq), v_smem, do_smem.at[slot], transpose_b=True)  # V dOᵀ
        plgpu.barrier_wait(delta_bar.at[slot])
        dst = pt * (dpt - _bcast(_load_stat(plan, delta_smem.at[slot], 0), dpt.shape, 1))
        if t is not None:
          dst = dst * (1.0 - t * t)
        dk = _mma_acc(plan, dk, dst.astype(plan.dtype), q_smem.at[slot])  # += dSᵀ Q
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      def flush(i):
        _release(lax.rem(base + i, _i32(NUM_STAGES)), streamed, consumed)

      return _sweep(lo_cta, hi_cta, rng, step, flush, carry)

    zeros = _zeros(plan, (bk, d), plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, plan.group, head_pass, (zeros, zeros))

    @pl.when(valid)
    def _():
      k_smem[...] = (dk * plan.scale).astype(plan.dtype)
      v_smem[...] = dv.astype(plan.dtype)
      _store_own([k_smem, v_smem], [_rows(dk_ref, batch, kv_head, k_start, bk),
                                    _rows(dv_ref, batch, kv_head, k_start, bk)])

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    _memory_prologue(plan)

    def load(s, slot):
      g = lax.div(s, per_head)
      start = (lo_cta + s - g * per_head) * bq
      head = kv_head * plan.group + g
      rows = pl.ds(start, bq)
      sources = (_rows(q_ref, batch, head, start, bq), lse_ref.at[batch, head, rows],
                 _rows(do_ref, batch, head, start, bq), delta_ref.at[batch, head, rows])
      for src, smem, barrier in zip(sources, (q_smem, lse_smem, do_smem, delta_smem),
                                    streamed):
        plgpu.copy_gmem_to_smem(src, smem.at[slot], barrier.at[slot])

    _produce(plan.group * per_head, NUM_STAGES, consumed, load)


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, scale: float,
                   mask: masks_lib.Mask, logits_soft_cap: float | None, q_offset: int,
                   kv_len: int, block_q: int, block_k: int, d_lse=None,
                   interpret: bool = False):
  """Flash-attention backward pass on Hopper (a dK/dV kernel and a dQ kernel).

  Args: as :func:`flash_forward`, plus the forward's ``out`` [B, Tq, H, D] and ``lse``
    [B, H, Tq], the output cotangent ``d_out`` [B, Tq, H, D] and optionally the lse
    cotangent ``d_lse`` [B, H, Tq] (None: zero). ``block_q``/``block_k`` are the backward
    block sizes (multiples of 64).

  Returns:
    dq [B, Tq, H, D]; dk, dv [B, Tk, Hkv, D], each summed over the H // Hkv query heads that
    share the kv head; in the input dtype, accumulated in float32.
  """
  _check("backward", q, k, v, mask=mask, logits_soft_cap=logits_soft_cap,
         has_segments=q_segment_ids is not None or kv_segment_ids is not None,
         block_q=block_q, block_k=block_k)
  b, tq, h, d = q.shape
  tk = k.shape[1]
  if 0 in (b, h, tq, d) or tk == 0 or kv_len == 0:
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
  plan = _plan(q, k, mask, scale=scale, soft_cap=logits_soft_cap, q_offset=q_offset,
               kv_len=min(kv_len, tk), block_q=block_q, block_k=block_k, interpret=interpret)
  tq_p, tk_p, dp = plan.nq * block_q, plan.nk * block_k, plan.head_dim
  # Row statistics [B, H, Tq] float32: delta = rowsum(dO * O) - dLSE, and the base-2 lse,
  # +inf for rows that see nothing (and for padded rows) so that their probabilities are 0.
  delta = attention_delta(out, d_out, d_lse, head_axis_last=True)
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  stats = [jnp.pad(x, ((0, 0), (0, 0), (0, tq_p - tq)), constant_values=c)
           for x, c in ((lse2, jnp.inf), (delta, 0.0))]
  q, d_out = (_pad(x, tq_p, dp) for x in (q, d_out))
  k, v = (_pad(x, tk_p, dp) for x in (k, v))
  dq, dk, dv = _backward_call(q, k, v, d_out, *stats, plan)
  return dq[:, :tq, :, :d], dk[:, :tk, :, :d], dv[:, :tk, :, :d]


def _backward_call(q, k, v, d_out, lse2, delta, plan: _Plan):
  """The dK/dV and dQ kernels on padded [B, T, H, Dp] arrays and [B, H, Tq] statistics."""
  b, _, h, dp = q.shape
  hkv = k.shape[2]
  block_q, block_k = plan.block_q, plan.block_k
  itemsize = plan.dtype.itemsize
  grid_names = ("tile", "heads", "batch")
  common = dict(num_threads=COMPUTE_WGS + 1, thread_name="wg", grid_names=grid_names,
                compiler_params=_compiler_params(), interpret=_interpret_params(plan.interpret))

  # dK, dV: one CTA per (2 key blocks, kv head, batch), streaming the group's query blocks.
  _check_smem("dK/dV", (2 * COMPUTE_WGS * block_k + 2 * NUM_STAGES * block_q) * dp * itemsize
              + 2 * NUM_STAGES * block_q * 4)
  stat_ring = _smem(plan, (NUM_STAGES, block_q), jnp.float32)
  dk, dv = plgpu.kernel(
      functools.partial(_dkdv_kernel, plan=plan),
      out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_types=[
          _smem(plan, (COMPUTE_WGS, block_k, dp)),  # K, then dK
          _smem(plan, (COMPUTE_WGS, block_k, dp)),  # V, then dV
          _smem(plan, (NUM_STAGES, block_q, dp)),  # Q ring
          _smem(plan, (NUM_STAGES, block_q, dp)),  # dO ring
          stat_ring, stat_ring,  # lse, delta rings
          plgpu.Barrier(num_barriers=2 * COMPUTE_WGS),  # own K, V loaded: [n * wgs + wg]
          plgpu.Barrier(num_barriers=NUM_STAGES),
          plgpu.Barrier(num_barriers=NUM_STAGES),
          plgpu.Barrier(num_barriers=NUM_STAGES),
          plgpu.Barrier(num_barriers=NUM_STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=NUM_STAGES),
      ],
      grid=(-(-plan.nk // COMPUTE_WGS), hkv, b),
      **common,
  )(q, k, v, d_out, lse2, delta)

  # dQ: one CTA per (2 query blocks, head, batch), streaming the visible key blocks.
  _check_smem("dQ", (2 * COMPUTE_WGS * block_q + 2 * NUM_STAGES * block_k) * dp * itemsize
              + 2 * COMPUTE_WGS * block_q * 4)
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, plan=plan),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=[
          _smem(plan, (COMPUTE_WGS, block_q, dp)),  # Q, then dQ
          _smem(plan, (COMPUTE_WGS, block_q, dp)),  # dO
          _smem(plan, (COMPUTE_WGS, block_q), jnp.float32),  # lse
          _smem(plan, (COMPUTE_WGS, block_q), jnp.float32),  # delta
          _smem(plan, (NUM_STAGES, block_k, dp)),  # K ring
          _smem(plan, (NUM_STAGES, block_k, dp)),  # V ring
          plgpu.Barrier(num_barriers=4 * COMPUTE_WGS),  # own Q, dO, lse, delta: [n * wgs + wg]
          plgpu.Barrier(num_barriers=NUM_STAGES),
          plgpu.Barrier(num_barriers=NUM_STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=NUM_STAGES),
      ],
      grid=(-(-plan.nq // COMPUTE_WGS), h, b),
      **common,
  )(q, k, v, d_out, lse2, delta)
  return dq, dk, dv


# ----------------------------------------------------------------------------- cost model


def cost(*, batch: int, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int,
         head_dim: int, dtype, mask: masks_lib.Mask, block_q: int, block_k: int,
         block_q_bwd: int, block_k_bwd: int, backward: bool = True):
  """FLOPs and HBM bytes of one call (forward, plus backward if asked) from the block plan.

  Counts what the kernels' grids do, from the same block ranges the kernels visit: the
  warpgroup MMA FLOPs of every visited block pair, every TMA copy the producer and the compute
  warpgroups issue (K/V once per query head and CTA in the forward and dQ; Q/dO/lse/delta
  once per kv head and key tile in dK/dV), outputs and statistics written, the XLA delta
  pass, and the zero-padding copies made for unaligned lengths or head dims.

  Returns:
    ``pallas_kernels._common.roofline.Cost``.
  """
  from pallas_kernels._common import roofline  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  isz = jnp.dtype(dtype).itemsize
  dp = padded_head_dim(head_dim)
  group = num_heads // num_kv_heads

  def plan_for(bq, bk):
    return _Plan(scale=1.0, soft_cap=None, diag=None if isinstance(mask, masks_lib.FullMask)
                 else (kv_len - q_len) - mask.shift, kv_len=kv_len, block_q=bq, block_k=bk,
                 nq=-(-q_len // bq), nk=-(-kv_len // bk), group=group, head_dim=dp,
                 dtype=jnp.dtype(dtype), interpret=True)

  def visits(range_fn, plan, n):
    """Per block: visited count; per CTA tile: the producer's union length."""
    blocks = jnp.arange(-(-n // COMPUTE_WGS) * COMPUTE_WGS)
    lo, _, _, hi = (np.asarray(x) for x in jax.vmap(
        lambda i: range_fn(plan, i, i < n))(blocks))
    lo, hi = lo.reshape(-1, COMPUTE_WGS), hi.reshape(-1, COMPUTE_WGS)
    return int((hi - lo).sum()), int((hi.max(1) - lo.min(1)).sum())

  parts = []
  flops = 0.0
  tile = lambda rows: rows * dp * isz

  def pad_copy(rows_p, rows, heads):  # read + write of a zero-padded copy
    if rows_p == rows and dp == head_dim:
      return 0.0
    return batch * heads * (rows * head_dim + rows_p * dp) * isz

  plan = plan_for(block_q, block_k)
  pairs, streamed = visits(_key_range, plan, plan.nq)
  flops += batch * num_heads * pairs * 4 * block_q * block_k * dp
  parts += [
      ("fwd.pad", pad_copy(plan.nq * block_q, q_len, num_heads)
       + 2 * pad_copy(plan.nk * block_k, kv_len, num_kv_heads)),
      ("fwd.q", batch * num_heads * plan.nq * tile(block_q)),
      ("fwd.kv", batch * num_heads * streamed * 2 * tile(block_k)),
      ("fwd.out+lse", batch * num_heads * plan.nq * (tile(block_q) + 4 * block_q)),
  ]
  if backward:
    plan = plan_for(block_q_bwd, block_k_bwd)
    bq, bk = block_q_bwd, block_k_bwd
    pairs_kv, streamed_q = visits(_query_range, plan, plan.nk)
    pairs_q, streamed_kv = visits(_key_range, plan, plan.nq)
    flops += batch * num_heads * (pairs_kv * 8 + pairs_q * 6) * bq * bk * dp
    rows_q = batch * num_heads * q_len
    parts += [
        ("bwd.pad", 3 * pad_copy(plan.nq * bq, q_len, num_heads)
         + 2 * pad_copy(plan.nk * bk, kv_len, num_kv_heads)),
        ("bwd.delta+lse2", rows_q * (2 * head_dim * isz + 4 * 4)),
        ("dkdv.kv", batch * num_kv_heads * plan.nk * 2 * tile(bk)),
        ("dkdv.q+do+stats", batch * num_heads * streamed_q * 2 * (tile(bq) + 4 * bq)),
        ("dkdv.out", batch * num_kv_heads * plan.nk * 2 * tile(bk)),
        ("dq.q+do+stats", batch * num_heads * plan.nq * 2 * (tile(bq) + 4 * bq)),
        ("dq.kv", batch * num_heads * streamed_kv * 2 * tile(bk)),
        ("dq.out", batch * num_heads * plan.nq * tile(bq)),
    ]
  return roofline.Cost(flops=float(flops), hbm_bytes=float(sum(b for _, b in parts)),
                       parts=tuple((name, float(b)) for name, b in parts))
