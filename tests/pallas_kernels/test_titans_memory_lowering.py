"""titans_memory's Pallas kernels lower for TPU (Mosaic) and GPU (Triton) from this CPU machine.

``jax.export`` runs the Pallas -> Mosaic / Triton lowering, which interpret mode never does;
a primitive or layout the lowering rejects fails here. Each case lowers the forward and the
backward (every gradient, the initial state's included) of the public op with
implementation="pallas" at realistic sizes, traced for the target platform. With a libtpu
wheel at hand (``LCLM_LIBTPU_PATH``), the TPU kernels are also compiled by Mosaic for v4,
v5e and v6e (``libtpu_compile.py``: layouts and VMEM, no TPU needed); Triton -> PTX still
needs a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from export_lowering import CUSTOM_CALL, export_mlir
from libtpu_compile import TOPOLOGIES, compile_programs, requires_libtpu
from pallas_kernels.titans_memory import titans_memory

# (batch, seq, heads, d_k, d_v) and options (chunk per platform; None: the default 64).
CASES = {
    # 8K tokens, 16 heads of 128: a long-context layer.
    "heads16_d128_8k": dict(shape=(1, 8192, 16, 128, 128)),
    # d_k != d_v, two batch rows, no initial state.
    "dk64_dv128_2k": dict(shape=(2, 2048, 8, 64, 128), initial_state=False),
    # Awkward sizes: a padded length, d_k / d_v not multiples of 128 (the GPU kernels pad
    # them to powers of two).
    "odd_sizes": dict(shape=(1, 900, 3, 60, 80)),
    # Larger chunks.
    "chunk128": dict(shape=(1, 2048, 8, 128, 64), chunk={"tpu": 128, "cuda": 128}),
    # A large state: the TPU kernels split d_v into two tiles of 128.
    "d256_dv_tiles": dict(shape=(1, 4096, 4, 256, 256)),
}


def _forward_and_gradient(case, dtype):
  """(label, fn, args) of the public op's forward and of its gradient (every argument)."""
  b, t, h, dk, dv = case["shape"]
  f32 = jnp.float32
  arrays = dict(q=jax.ShapeDtypeStruct((b, t, h, dk), dtype),
                k=jax.ShapeDtypeStruct((b, t, h, dk), dtype),
                v=jax.ShapeDtypeStruct((b, t, h, dv), dtype),
                lr=jax.ShapeDtypeStruct((b, t, h), f32),
                momentum=jax.ShapeDtypeStruct((b, t, h), f32),
                decay=jax.ShapeDtypeStruct((b, t, h), f32))
  state = None
  if case.get("initial_state", True):
    state = (jax.ShapeDtypeStruct((b, h, dk, dv), f32),) * 2
  chunk = case.get("chunk", {})

  def make(platform):
    def forward(arrays, state):
      return titans_memory(**arrays, chunk_size=chunk.get(platform), initial_state=state,
                           return_final_state=True, implementation="pallas")

    def loss(arrays, state):
      o, (m, s) = forward(arrays, state)
      return jnp.sum(o.astype(f32) ** 2) + jnp.sum(m ** 2) + jnp.sum(s * m)

    argnums = (0, 1) if state is not None else 0
    return forward, jax.grad(loss, argnums=argnums)

  return make, (arrays, state)


def _export(platform, case, dtype, with_backward):
  make, args = _forward_and_gradient(case, dtype)
  forward, gradient = make(platform)
  return export_mlir(gradient if with_backward else forward, args, platform)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower(platform, case, dtype):
  forward = _export(platform, CASES[case], dtype, with_backward=False)
  assert forward.count(CUSTOM_CALL[platform]) == 1
  backward = _export(platform, CASES[case], dtype, with_backward=True)
  # The forward (with the saved states for the residuals) and the backward kernel.
  assert backward.count(CUSTOM_CALL[platform]) == 2
  if platform == "tpu":
    for name in ("lclm_titans_fwd", "lclm_titans_bwd"):
      assert name in backward


# Mosaic compiles (libtpu_compile.py): realistic sizes, plus awkward ones.
COMPILE_CASES = {
    "heads16_d128_8k": CASES["heads16_d128_8k"],
    "dk64_dv128_2k": CASES["dk64_dv128_2k"],
    "odd_sizes": CASES["odd_sizes"],
    "d256_dv_tiles": CASES["d256_dv_tiles"],
    # The largest chunk the TPU kernels take, and the smallest (two grid steps of 8 chunks).
    "chunk256": dict(shape=(1, 2048, 4, 128, 128), chunk={"tpu": 256}),
    "chunk8": dict(shape=(1, 1000, 2, 64, 64), chunk={"tpu": 8}),
}


def tpu_programs(case):
  """For libtpu_compile: forward and backward of ``case`` in bfloat16 and float32."""
  programs = []
  for dtype in (jnp.bfloat16, jnp.float32):
    make, args = _forward_and_gradient(COMPILE_CASES[case], dtype)
    forward, gradient = make("tpu")
    programs += [(f"{dtype.__name__} forward", forward, args),
                 (f"{dtype.__name__} backward", gradient, args)]
  return programs


@pytest.mark.slow  # about 2 minutes on 2 cores (72 compiles)
@requires_libtpu
def test_tpu_kernels_compile_with_mosaic():
  compiled = compile_programs("test_titans_memory_lowering", COMPILE_CASES)
  assert len(compiled) == len(TOPOLOGIES) * len(COMPILE_CASES) * 4, compiled
