"""Ahead-of-time export of a kernel program for TPU or CUDA from any host (lowering tests)."""

import jax

from pallas_kernels._common import dispatch

TRITON_CALL = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": TRITON_CALL}


def export_mlir(fn, args, platform: str) -> str:
  """MLIR text of ``jax.jit(fn)(*args)`` exported for ``platform`` ("tpu" or "cuda").

  The ops inside trace the kernels of that platform (``dispatch.target_platform``); the
  Triton custom call, which jax.export does not list as stable, is allowed for CUDA.
  """
  disabled = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
              if platform == "cuda" else [])
  with dispatch.target_platform("gpu" if platform == "cuda" else platform):
    exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=disabled)(*args)
  return exported.mlir_module()
