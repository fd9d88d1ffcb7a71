"""titans_memory's 2-layer MLP memory kernels (``tpu_mlp.py``) lower for TPU (Mosaic) from this
CPU machine, and compile through Mosaic's own passes with a libtpu wheel.

As test_titans_memory_lowering.py: ``jax.export`` of the public op's forward and of its
gradient (every input and all four initial-state matrices) with implementation="pallas",
traced for TPU, at realistic sizes (d_h = 2 d, the paper's hidden multiple); with
``LCLM_LIBTPU_PATH`` set, a slow test compiles them for v4, v5e and v6e
(``libtpu_compile.py``: layouts and VMEM, no TPU needed). GPU keeps the XLA path for this
memory, so there is no CUDA case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from libtpu_compile import TOPOLOGIES, compile_programs, requires_libtpu
from pallas_kernels.titans_memory import titans_memory

# (batch, seq, heads, d_k, d_h, d_v) and the chunk (None: the default 64).
CASES = {
    # 8K tokens, 16 heads of 128, hidden 256: the largest memory the kernels hold in VMEM.
    "heads16_d128_h256_8k": dict(shape=(1, 8192, 16, 128, 256, 128)),
    # 8 heads of 64, hidden 128, two batch rows, a padded length.
    "heads8_d64_h128_ragged": dict(shape=(2, 8000, 8, 64, 128, 64)),
    # d_k != d_v, larger chunks.
    "dk128_dv64_chunk128": dict(shape=(1, 4096, 8, 128, 256, 64), chunk=128),
    # The largest chunk (128; at 256 Mosaic fails a RET_CHECK) at the largest memory.
    "d128_h256_chunk128": dict(shape=(1, 2048, 4, 128, 256, 128), chunk=128),
}


def _forward_and_gradient(case, dtype):
  """(forward, gradient, args) of the public op for ``case``."""
  b, t, h, dk, dh, dv = case["shape"]
  f32 = jnp.float32
  arrays = dict(q=jax.ShapeDtypeStruct((b, t, h, dk), dtype),
                k=jax.ShapeDtypeStruct((b, t, h, dk), dtype),
                v=jax.ShapeDtypeStruct((b, t, h, dv), dtype),
                lr=jax.ShapeDtypeStruct((b, t, h), f32),
                momentum=jax.ShapeDtypeStruct((b, t, h), f32),
                decay=jax.ShapeDtypeStruct((b, t, h), f32))
  layers = (jax.ShapeDtypeStruct((b, h, dk, dh), f32), jax.ShapeDtypeStruct((b, h, dh, dv), f32))
  state = (layers, layers)

  def forward(arrays, state):
    return titans_memory(**arrays, chunk_size=case.get("chunk"), initial_state=state,
                         return_final_state=True, implementation="pallas")

  def loss(arrays, state):
    o, ((w1, w2), (s1, s2)) = forward(arrays, state)
    return (jnp.sum(o.astype(f32) ** 2) + jnp.sum(w1 ** 2) + jnp.sum(w2 * s2)
            + jnp.sum(s1 * w1))

  return forward, jax.grad(loss, argnums=(0, 1)), (arrays, state)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower_for_tpu(case, dtype):
  forward, gradient, args = _forward_and_gradient(CASES[case], dtype)
  mlir = export_mlir(forward, args, "tpu")
  assert mlir.count(CUSTOM_CALL["tpu"]) == 1
  assert "lclm_titans_mlp_fwd" in mlir
  mlir = export_mlir(gradient, args, "tpu")
  # The forward (with the saved group states for the residuals) and the backward kernel.
  assert mlir.count(CUSTOM_CALL["tpu"]) == 2
  for name in ("lclm_titans_mlp_fwd", "lclm_titans_mlp_bwd"):
    assert name in mlir


def tpu_programs(case):
  """For libtpu_compile: forward and backward of ``case`` in bfloat16 and float32."""
  programs = []
  for dtype in (jnp.bfloat16, jnp.float32):
    forward, gradient, args = _forward_and_gradient(CASES[case], dtype)
    programs += [(f"{dtype.__name__} forward", forward, args),
                 (f"{dtype.__name__} backward", gradient, args)]
  return programs


@pytest.mark.slow  # about 2 minutes on 2 cores (48 compiles)
@requires_libtpu
def test_tpu_kernels_compile_with_mosaic():
  compiled = compile_programs("test_titans_memory_mlp_lowering", CASES, timeout=1800)
  assert len(compiled) == len(TOPOLOGIES) * len(CASES) * 4, compiled
