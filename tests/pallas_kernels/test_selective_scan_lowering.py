"""selective_scan lowers for TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does.
Each case lowers the forward and the backward (all gradients) of the public op at realistic
sizes, traced for the target platform.

When a libtpu wheel is at hand (``LCLM_LIBTPU_PATH`` = path of libtpu.so), the TPU kernels
are also *compiled* by Mosaic for v4, v5e and v6e through a compile-only TPU topology (no TPU
needed; ``libtpu_compile.py``): that runs Mosaic's layout passes, which reject what plain
lowering lets through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from libtpu_compile import TOPOLOGIES, compile_programs, requires_libtpu
from pallas_kernels.selective_scan import selective_scan


# name -> (batch, seq, d_inner, d_state, n_groups or None), options
CASES = {
    # Mamba-790M-like layer: d_inner 3072, everything on.
    "mamba_d3072_all_options": ((1, 2048, 3072, 16, None), dict(z=True, D=True, bias=True,
                                                                 h0=True)),
    "packed_segments_4096_d1536": ((2, 4096, 1536, 16, None), dict(z=True, D=True, bias=True,
                                                                   segments=True)),
    # Odd sizes: 250 channels per group (padded per group), d_state 12, no gate or D.
    "groups4_d1000_state12_len1000": ((1, 1000, 1000, 12, 4), dict(bias=True, h0=True,
                                                                   segments=True)),
}


def _args(case, dtype):
  (b, t, d, n, g), opts = CASES[case]
  bc = (b, t, n) if g is None else (b, t, g, n)
  spec = jax.ShapeDtypeStruct
  args = dict(u=spec((b, t, d), dtype), delta=spec((b, t, d), dtype),
              A=spec((d, n), jnp.float32), B=spec(bc, dtype), C=spec(bc, dtype))
  if opts.get("D"):
    args["D"] = spec((d,), jnp.float32)
  if opts.get("z"):
    args["z"] = spec((b, t, d), dtype)
  if opts.get("bias"):
    args["delta_bias"] = spec((d,), jnp.float32)
  if opts.get("h0"):
    args["initial_state"] = spec((b, d, n), jnp.float32)
  segments = spec((b, t), jnp.int32) if opts.get("segments") else None
  return args, segments


def _forward_and_gradient(case, dtype):
  """The public op's forward and its gradient (every argument) as (fn, argument specs)."""
  args, segments = _args(case, dtype)
  names = list(args)
  specs = list(args.values()) + ([segments] if segments is not None else [])

  def forward(*values):
    seg = values[len(names)] if segments is not None else None
    return selective_scan(**dict(zip(names, values[:len(names)])), delta_softplus=True,
                          return_final_state=True, implementation="pallas", segment_ids=seg)

  def loss(*values):
    y, h = forward(*values)
    return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h * h)

  return [("forward", forward, specs),
          ("backward", jax.grad(loss, argnums=tuple(range(len(names)))), specs)]


def _export(platform, case, dtype, with_backward):
  programs = {label: (fn, specs) for label, fn, specs in _forward_and_gradient(case, dtype)}
  fn, inputs = programs["backward" if with_backward else "forward"]
  return export_mlir(fn, inputs, platform)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower(platform, case, dtype):
  forward = _export(platform, case, dtype, with_backward=False)
  assert forward.count(CUSTOM_CALL[platform]) == 1
  backward = _export(platform, case, dtype, with_backward=True)
  # The forward (for the residuals) and the backward kernel.
  assert backward.count(CUSTOM_CALL[platform]) == 2


def tpu_programs(case):
  """For libtpu_compile: forward and backward of ``case`` in bfloat16 and float32."""
  return [(f"{dtype.__name__} {label}", fn, specs) for dtype in (jnp.bfloat16, jnp.float32)
          for label, fn, specs in _forward_and_gradient(case, dtype)]


@pytest.mark.slow  # about a minute on 2 cores
@requires_libtpu
def test_tpu_kernels_compile_with_mosaic():
  compiled = compile_programs("test_selective_scan_lowering", CASES)
  assert len(compiled) == len(TOPOLOGIES) * len(CASES) * 4, compiled
