"""Roofline cost of one SSD or lightning-attention call from the kernels' block plan (GUIDE §5).

:func:`ssd_cost` counts what the chunked scalar-decay kernels (``core.py`` with ``tpu.py`` or
``gpu.py``) move between HBM and the core and compute for one call: x [batch, seq, heads, P],
B, C [batch, seq, groups, N] in ``dtype``; dt float32 [batch, seq, heads]; with ``gated`` also
z (like x) and D; no segments, no initial state. Lightning attention is the same call with
x = v (P = d_v), B = k, C = q (N = d_k) and one group per head: :func:`lightning_cost`.

TPU plan (``tpu.make_plan``): XLA transposes x (and z) to [batch, heads, seq, P] and B, C to
[batch, groups, seq, N] (unpadded), and writes the per-token rows (dt, acum, acum_lo; the
backward's ddt, da) as float32. Forward grid (batch, groups, head blocks, chunks): x, z read
once, B and C once per head block, y written once in x's dtype (D x and the gate fused), the
state saved every ``interval`` chunks (float32), y before the gate saved when gated. Backward
grid (..., super-chunks) in reverse: x, dy, B, C, rows and the saved states read once, dx,
ddt, da written once, dB and dC written once per head block (summed by XLA when a group has
several blocks); the gate's gradient is elementwise XLA (dout, z, y_pre, x read; dz and dy
written; dx += D dy).

GPU plan (``gpu.py``): x, B, C transposed and padded (P to the head tile, N to a power of two
>= 16); the chunk-parallel kernels: chunk states (float32, every chunk), the state passing
(reads them, writes the entering states in place), the chunk output (y in x's dtype, re-read
by XLA for D x and the gate); the backward's chunk cotangents, reverse passing and chunk
gradients, dB and dC written per head (and head tile) in float32 and summed by XLA.

FLOPs are MXU FLOPs including the passes each product takes: 1 for bfloat16 operands, 2 for a
float32 operand split into bfloat16 halves ("bf16x2"), 6 for float32 products at HIGHEST
("highest", float32 inputs on TPU); on the GPU 1 for 16-bit inputs and 6 for float32 ones
(TF32x3: three TF32 passes at half the bf16 tensor-core rate).
"""

from __future__ import annotations

from pallas_kernels._common.roofline import Cost, itemsize

_BACKENDS = ("tpu", "gpu")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def ssd_cost(*, batch: int, seq_len: int, num_heads: int, head_dim: int, num_groups: int,
             d_state: int, dtype, chunk_size: int | None = None, backend: str = "tpu",
             backward: bool = False, gated: bool = False, precision: str | None = None,
             interval: int | None = None, heads_per_block: int | None = None,
             block_head_dim: int | None = None) -> Cost:
  """FLOPs and HBM bytes of one ``ssd`` call (forward, or forward + backward).

  Args:
    batch, seq_len, num_heads, head_dim, num_groups, d_state: the sizes (positive ints;
      num_heads a multiple of num_groups).
    dtype: dtype of x, B, C (and z).
    chunk_size: tokens per chunk (None: the backend's default).
    backend: "tpu" or "gpu": whose block plan to count.
    backward: count the forward (which saves what the backward needs) and the backward.
    gated: D and z are passed.
    precision, interval, heads_per_block: TPU plan options (None: the defaults ``ssd``
      picks); block_head_dim: the GPU head tile (None: 64).

  Returns:
    A :class:`Cost` whose ``parts`` name the terms ("layout", "fwd.x", "fwd.bc", "fwd.rows",
    "fwd.states", "bwd.x", "bwd.bc", "bwd.dbc", "bwd.rows", "bwd.states", "bwd.gate").
  """
  sizes = dict(batch=batch, seq_len=seq_len, num_heads=num_heads, head_dim=head_dim,
               num_groups=num_groups, d_state=d_state)
  for name, value in sizes.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"ssd_cost: {name} must be a positive int, got {value!r}.")
  if num_heads % num_groups:
    raise ValueError(f"ssd_cost: num_heads ({num_heads}) must be a multiple of num_groups "
                     f"({num_groups}).")
  if backend not in _BACKENDS:
    raise ValueError(f"ssd_cost: backend must be one of {_BACKENDS}, got {backend!r}.")
  if backend == "gpu":
    return _gpu_cost(**sizes, dtype=dtype, chunk_size=chunk_size, backward=backward,
                     gated=gated, block_head_dim=block_head_dim)
  from pallas_kernels.ssd import core, tpu  # pylint: disable=import-outside-toplevel
  s = itemsize(dtype)
  b, h, g, P, N = batch, num_heads, num_groups, head_dim, d_state
  L = tpu.shrink_chunk_size(chunk_size or tpu.DEFAULT_CHUNK_SIZE, seq_len)
  plan = tpu.make_plan(heads=h, groups=g, seq=seq_len, head_dim=P, d_state=N, itemsize=s,
                       chunk_size=L, interval=interval, heads_per_block=heads_per_block,
                       precision=precision or core.default_precision(dtype))
  T = plan.padded_len(seq_len)
  K, HB = plan.interval, plan.heads_per_block
  nhb = h // g // HB
  nc = T // L
  xs = b * h * T * P * s  # one [batch, heads, seq, P] array in x's dtype
  bcs = b * g * T * N * s  # one of B, C
  rows = b * h * T * 4  # one float32 row array
  state = b * h * P * N * 4
  f32_passes = 6 if plan.precision == "highest" else 2
  in_passes = 6 if plan.precision == "highest" else 1

  # Layout: XLA's transposes in (x, B, C, z) and out (y), dt_eff, a and its cumulative sums.
  n_seq = 1 + (1 if gated else 0)
  layout = 2 * (n_seq * xs + 2 * bcs) + 2 * xs + rows + 4 * rows
  parts = [("layout", layout)]
  fwd_x = n_seq * xs + xs + (xs if (gated and backward) else 0)
  fwd_bc = 2 * bcs * nhb
  fwd_rows = 3 * rows
  fwd_states = 2 * state + ((nc // K) * state if backward else 0)
  parts += [("fwd.x", fwd_x), ("fwd.bc", fwd_bc), ("fwd.rows", fwd_rows),
            ("fwd.states", fwd_states)]
  # Forward FLOPs per chunk: C B^T per head block; per head intra (weights x), inter
  # (C H^T) and the state update (x^T w B).
  per_head = 2 * L * L * P * in_passes + 2 * (2 * L * N * P) * f32_passes
  flops = b * nc * (g * nhb * 2 * L * L * N * in_passes + h * per_head)
  if backward:
    bwd_x = 3 * xs
    bwd_bc = 2 * bcs * nhb
    bwd_dbc = 2 * bcs * nhb if nhb == 1 else 2 * (2 * b * g * nhb * T * N * 4) + 2 * bcs
    bwd_rows = 5 * rows
    bwd_states = (nc // K) * state + 2 * state
    # Transposes of dy in and dx (dz), dB, dC out; the gate's elementwise gradient.
    bwd_layout = 2 * (xs + xs + 2 * bcs) + (2 * xs if gated else 0)
    bwd_gate = (4 * xs + 2 * xs + 3 * xs) if gated else 0
    parts += [("bwd.x", bwd_x), ("bwd.bc", bwd_bc), ("bwd.dbc", bwd_dbc),
              ("bwd.rows", bwd_rows), ("bwd.states", bwd_states),
              ("bwd.layout", bwd_layout), ("bwd.gate", bwd_gate)]
    # Backward per head and chunk: dy x^T, weights^T dy, d_cb B, d_cb^T C (input passes);
    # B dH^T, dy H, x dH, C H^T, (dy into)^T C, m @ before (L^3) and the recomputed state
    # update (float32 passes); C B^T per head block.
    per_head = (2 * 2 * L * L * P + 2 * 2 * L * L * N) * in_passes + (
        5 * 2 * L * N * P + 2 * L * L * L + 2 * L * N * P * (K - 1) / K) * f32_passes
    flops += b * nc * (g * nhb * 2 * L * L * N * in_passes + h * per_head)
  return Cost(flops=float(flops), hbm_bytes=float(sum(v for _, v in parts)),
              parts=tuple(parts))


def _gpu_cost(*, batch, seq_len, num_heads, head_dim, num_groups, d_state, dtype, chunk_size,
              backward, gated, block_head_dim):
  from pallas_kernels.ssd import gpu  # pylint: disable=import-outside-toplevel
  s = itemsize(dtype)
  b, h, g, P, N = batch, num_heads, num_groups, head_dim, d_state
  L = gpu.shrink_chunk_size(chunk_size or gpu.DEFAULT_CHUNK_SIZE, seq_len)
  bp = gpu.block_head_dim(block_head_dim, P)
  Pp, Np = gpu.padded_head_dim(P, bp), gpu.padded_state_dim(N)
  T = _round_up(seq_len, L)
  nc = T // L
  tiles = Pp // bp
  xs, xp = b * h * T * P * s, b * h * T * Pp * s
  bcp = b * g * T * Np * s
  bc_reads = bcp * h // g * tiles  # B or C, once per (head, tile) program
  rows = b * h * T * 4
  state = b * h * Pp * Np * 4
  chunk_states = nc * state  # float32, every chunk
  stored = chunk_states * s // 4 if s == 2 else chunk_states  # the passed states, operand dtype
  # 16-bit inputs: one tensor-core pass; float32: TF32x3, three passes at half the bf16 rate.
  passes = 1 if s == 2 else 6
  layout = xs + xp + 2 * (b * g * T * N * s + bcp) + 4 * rows
  gate = xp + (2 * xs if gated else 0) + xs  # y read with x (and z), out written
  # chunk states (x, B, 3 rows in; S out), passing (S in, states out), output (x, B, C,
  # 3 rows, states in; y out).
  parts = [("layout", layout), ("fwd.x", 2 * xp + xp), ("fwd.bc", 3 * bc_reads),
           ("fwd.rows", 6 * rows * tiles + b * h * nc * 4),
           ("fwd.states", 2 * chunk_states + 2 * stored + 2 * state), ("fwd.gate", gate)]
  per_chunk = tiles * (2 * L * bp * Np + 2 * L * L * Np + 2 * L * L * bp + 2 * L * Np * bp)
  flops = b * h * nc * per_chunk * passes
  if backward:
    dbc32 = b * h * tiles * T * Np * 4
    # cotangents (dy, C, 2 rows in; G out), reverse passing (G in, ends out), gradients
    # (x, B, C, 3 rows, states, ends, dy in; dx, dB/dC/ddt/da partials out), XLA's sums.
    parts += [("bwd.x", xp + 3 * xp), ("bwd.bc", bc_reads + 2 * bc_reads),
              ("bwd.dbc", 2 * dbc32 + 2 * bcp),
              ("bwd.rows", (2 + 3) * rows * tiles + 2 * 2 * rows * tiles + 2 * rows),
              ("bwd.states", 2 * chunk_states + 3 * stored + 2 * state),
              ("bwd.layout", 2 * (xs + xp)), ("bwd.gate", (6 * xs) if gated else 2 * xs)]
    per_chunk = tiles * (2 * L * bp * Np + 3 * 2 * L * L * Np + 2 * 2 * L * L * bp
                         + 5 * 2 * L * Np * bp + 2 * L ** 3)
    flops += b * h * nc * per_chunk * passes
  return Cost(flops=float(flops), hbm_bytes=float(sum(v for _, v in parts)),
              parts=tuple(parts))


def lightning_cost(*, batch: int, seq_len: int, num_heads: int, d_k: int, d_v: int, dtype,
                   chunk_size: int | None = None, backend: str = "tpu", backward: bool = False,
                   precision: str | None = None) -> Cost:
  """FLOPs and HBM bytes of one ``lightning_attention`` call: :func:`ssd_cost` with x = v,
  B = k, C = q and one group per head (the per-token rows are the dt = 1 and log-decay rows
  the core forms)."""
  return ssd_cost(batch=batch, seq_len=seq_len, num_heads=num_heads, head_dim=d_v,
                  num_groups=num_heads, d_state=d_k, dtype=dtype, chunk_size=chunk_size,
                  backend=backend, backward=backward, precision=precision)
