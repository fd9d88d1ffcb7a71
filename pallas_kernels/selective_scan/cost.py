"""Roofline cost of one ``selective_scan`` call from the kernels' block plan (GUIDE §5).

:func:`scan_cost` counts what the Pallas kernels of ``tpu.py`` / ``gpu.py`` move and compute
for one call: u, delta, z [batch, seq, d_inner] (input dtype), A [d_inner, d_state], B, C
[batch, seq, n_groups, d_state] (input dtype), D and the delta bias [d_inner] float32, no
initial state, no segments; y like u. Sizes: ``seq`` is taken as a whole number of chunks
(TPU) and d_inner / n_groups as a whole number of channel blocks (the benchmark's case;
padding would add its bytes on top); the GPU's saved states count its padded windows.

Plan (one program per (channel block, batch row), walking the whole sequence):

* TPU: grid (batch, d / block_d, chunks). B and C are first transposed and padded by XLA to
  [batch, groups, seq, n_lanes] (d_state padded to 128 lanes, input dtype), then read once
  per channel block; the state h is [n_pad, block_d] (d_state padded to 8 sublanes); the
  forward saves the state at every chunk start (float32 [batch, chunks, n_pad, d]); the
  backward re-reads everything in reverse, plus the saved states and dy, and writes dB, dC
  per channel block in float32 ([batch, d / block_d, seq, n_lanes]), summed by XLA.
* GPU: grid (d / block_d, batch). B and C transposed and padded to [batch, groups, seq,
  n_p] (n_p = d_state to a power of two >= 16), read once per channel block; the sequence is
  padded to whole register windows (``window`` = ``gpu.default_chunk(block_d_bwd, d_state)``:
  16, 8 from d_state 128); the forward saves the state only every ``chunk`` tokens
  (min(round_up(2048, window), round_up(seq, window))) as float32 [batch, chunks, d, n_p];
  the backward recomputes each chunk from it into a float32 window-state workspace and adds
  dB, dC atomically into two float32 [batch, groups, seq, n_p] accumulators
  (``gpu.state_bytes``).

HBM bytes (``Cost.parts``): "x" (u, delta, z read; y written), "bc" (the transposed copies
written, then read per channel block; the XLA transpose's read of B and C), "states" (saved
chunk states written, read back by the backward), "bwd.x" (u, delta, z, dy read; du,
ddelta, dz written), "bwd.bc" (B, C read again), "bwd.states" (the saved states read),
"bwd.workspace" (GPU: every window's entering state written and read once), "bwd.dbc" (TPU:
the float32 partial dB, dC per channel block written, read by the XLA sum; GPU: the two
float32 accumulators zeroed and read by XLA's transpose; both: the summed dB, dC written),
"params" / "bwd.params" (A, D, bias per batch row; dA, dD, d(bias), d(state): small).
"l2.dbc_atomics" (GPU backward only) is the float32 rows the channel-block programs add
atomically into the accumulators: L2 traffic, reported in ``parts`` but not in
``hbm_bytes``.

FLOPs are element-wise (the recurrence runs on the VPU / CUDA cores, not the matrix units, so
the compute bound from the bf16 matrix rate is optimistic): per (token, channel, state) 7
forward and 19 more backward, per (token, channel) 6 and 10 (as
``experiments/bench_selective_scan.py``), on the padded d_state the kernels compute (the GPU
backward's chunk recompute, one more forward step per element, is not counted).
"""

from __future__ import annotations

import math

from pallas_kernels._common.roofline import Cost, itemsize

_BACKENDS = ("tpu", "gpu")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def scan_plan(*, backend: str, d_inner: int, d_state: int, n_groups: int = 1,
              chunk: int | None = None, block_d: int | None = None,
              block_d_bwd: int | None = None, seq_len: int | None = None) -> dict:
  """The block plan's sizes: chunk, block_d, block_d_bwd, n_state (the padded d_state of
  the state tile), n_bc (the padded d_state of the B / C copies), d_pad (padded channels);
  GPU also window (tokens per register window) and seq_pad (``seq_len`` padded to whole
  windows; None without ``seq_len``).

  None takes the defaults ``ops.py`` picks (TPU: chunk 128 shrunk so the backward's
  [chunk, n_pad, block_d_bwd] float32 buffer fits 4 MiB, block_d 512 / block_d_bwd 256 capped
  to the channels per group; GPU: block_d 16, window ``gpu.default_chunk`` (16, 8 from
  d_state 128, at most ``chunk`` and ``seq_len``), chunk 2048 rounded up to whole windows
  and shrunk to ``seq_len`` rounded up to whole windows, as ``ops._gpu_sizes``).
  """
  if backend not in _BACKENDS:
    raise ValueError(f"scan_plan: backend must be one of {_BACKENDS}, got {backend!r}.")
  cpg = d_inner // n_groups
  if backend == "tpu":
    from pallas_kernels.selective_scan import tpu  # pylint: disable=import-outside-toplevel
    n_pad, n_lanes = _round_up(d_state, tpu.SUBLANES), _round_up(d_state, tpu.LANES)
    if chunk is None:
      fit = tpu.STATE_BUFFER_BYTES // (n_pad * tpu.CHANNEL_MULTIPLE * 4)
      chunk = min(tpu.DEFAULT_CHUNK,
                  max(tpu.CHUNK_MULTIPLE, fit // tpu.CHUNK_MULTIPLE * tpu.CHUNK_MULTIPLE))
    cpg_pad = _round_up(cpg, tpu.CHANNEL_MULTIPLE)
    blocks = []
    for requested, default, bwd in ((block_d, tpu.DEFAULT_BLOCK_D, False),
                                    (block_d_bwd, tpu.DEFAULT_BLOCK_D_BWD, True)):
      size = min(default if requested is None else requested, cpg_pad)
      while cpg_pad % size or (bwd and requested is None and size > tpu.CHANNEL_MULTIPLE
                               and chunk * n_pad * size * 4 > tpu.STATE_BUFFER_BYTES):
        size -= tpu.CHANNEL_MULTIPLE
      blocks.append(size)
    return dict(chunk=chunk, block_d=blocks[0], block_d_bwd=blocks[1], n_state=n_pad,
                n_bc=n_lanes, d_pad=cpg_pad * n_groups)
  from pallas_kernels.selective_scan import gpu  # pylint: disable=import-outside-toplevel
  n_p = max(gpu.MIN_STATE, _next_pow2(d_state))
  cap = max(gpu.CHANNEL_MULTIPLE, _next_pow2(cpg))
  block_d = min(gpu.DEFAULT_BLOCK_D if block_d is None else block_d, cap)
  block_d_bwd = min(gpu.DEFAULT_BLOCK_D_BWD if block_d_bwd is None else block_d_bwd, cap)
  requested = gpu.DEFAULT_STATE_CHUNK if chunk is None else chunk
  seq = None if seq_len is None else max(seq_len, 1)
  window = min(gpu.default_chunk(block_d_bwd, d_state), requested, seq or requested)
  chunk = _round_up(requested, window)
  if seq is not None:
    chunk = min(chunk, _round_up(seq, window))
  cpg_pad = _round_up(cpg, max(block_d, block_d_bwd))
  return dict(chunk=chunk, block_d=block_d, block_d_bwd=block_d_bwd, n_state=n_p, n_bc=n_p,
              d_pad=cpg_pad * n_groups, window=window,
              seq_pad=None if seq is None else _round_up(seq, window))


def scan_cost(*, batch: int, seq_len: int, d_inner: int, d_state: int, dtype, backend: str,
              n_groups: int = 1, has_z: bool = True, chunk: int | None = None,
              block_d: int | None = None, block_d_bwd: int | None = None,
              backward: bool = False) -> Cost:
  """FLOPs and HBM bytes of one selective-scan call (forward, or forward + backward).

  Args:
    batch, seq_len, d_inner, d_state, n_groups: the sizes (positive ints; d_inner a
      multiple of n_groups).
    dtype: dtype of u, delta, z, B, C (e.g. "bfloat16").
    backend: "tpu" or "gpu": whose block plan to count.
    has_z: whether the z gate is passed.
    chunk, block_d, block_d_bwd: as ``selective_scan``'s arguments (None: defaults, see
      :func:`scan_plan`).
    backward: count the forward (which saves the states) and the backward.

  Returns:
    A :class:`Cost`; ``parts`` as in the module docstring.
  """
  for name, value in (("batch", batch), ("seq_len", seq_len), ("d_inner", d_inner),
                      ("d_state", d_state), ("n_groups", n_groups)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"scan_cost: {name} must be a positive int, got {value!r}.")
  if d_inner % n_groups:
    raise ValueError(f"scan_cost: d_inner ({d_inner}) must be a multiple of n_groups "
                     f"({n_groups}).")
  plan = scan_plan(backend=backend, d_inner=d_inner, d_state=d_state, n_groups=n_groups,
                   chunk=chunk, block_d=block_d, block_d_bwd=block_d_bwd, seq_len=seq_len)
  size = itemsize(dtype)
  b, t, d = batch, seq_len, plan["d_pad"]
  n_state, n_bc = plan["n_state"], plan["n_bc"]
  chunks = math.ceil(t / plan["chunk"])
  streams = 3 if has_z else 2  # u, delta (, z)
  row = b * t * d * size  # one [batch, seq, d] array
  bc_copy = 2 * b * n_groups * t * n_bc * size  # the transposed, padded B and C

  def bc_traffic(bd):
    blocks = d // bd  # each channel block reads its group's B and C rows
    return 2 * b * t * n_groups * d_state * size + bc_copy + blocks * bc_copy / n_groups

  params = b * d * (n_state + 8) * 4  # A (padded states) and D / bias rows, per batch row
  dbc_out = 2 * b * t * n_groups * d_state * size  # the summed dB, dC written
  if backend == "gpu":
    from pallas_kernels.selective_scan import gpu  # pylint: disable=import-outside-toplevel
    gpu_bytes = gpu.state_bytes(batch=b, seq_pad=plan["seq_pad"], d_pad=d, n=d_state,
                                n_groups=n_groups, window=plan["window"], chunk=plan["chunk"],
                                block_d_bwd=plan["block_d_bwd"])
    states = gpu_bytes["states"]
    bwd_states = [("bwd.states", float(gpu_bytes["bwd.states"])),
                  ("bwd.workspace", float(gpu_bytes["bwd.workspace"]))]
    bwd_dbc = gpu_bytes["bwd.dbc"] + dbc_out
  else:
    states = b * chunks * n_state * d * 4
    bwd_states = [("bwd.states", float(states))]
    bwd_dbc = 2 * 2 * b * (d // plan["block_d_bwd"]) * t * n_bc * 4 + dbc_out
  parts = [("x", float((streams + 1) * row)), ("bc", float(bc_traffic(plan["block_d"]))),
           ("states", float(states)), ("params", float(params))]
  elements, channels = b * t * d * n_state, b * t * d
  flops = 7.0 * elements + 6.0 * channels
  if backward:
    parts += [
        ("bwd.x", float((streams + 1) * row + streams * row)),
        ("bwd.bc", float(bc_traffic(plan["block_d_bwd"]))),
        *bwd_states,
        ("bwd.dbc", float(bwd_dbc)),
        # A, D, bias read again; dA, dD / d(bias) per batch row written; d(final) read and
        # d(initial state) written.
        ("bwd.params", float(2 * params + 2 * b * n_state * d * 4)),
    ]
    flops += 19.0 * elements + 10.0 * channels
  hbm = sum(v for _, v in parts)
  if backward and backend == "gpu":  # L2 traffic: shown, not counted in HBM bytes.
    parts.append(("l2.dbc_atomics", float(gpu_bytes["bwd.dbc_atomics"])))
  return Cost(flops, hbm, tuple(parts))
