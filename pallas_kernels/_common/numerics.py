"""Small numeric helpers shared by the kernels, their XLA paths and their references.

Every function here is plain ``jax.numpy`` / ``lax`` on the values it is given, so it traces
the same inside a Pallas kernel (Mosaic on TPU, Triton on GPU, the interpreter) as in XLA
code: calling it is exactly the same program as writing its body inline.

* :func:`compute_dtype`: the arithmetic dtype of an op, float64 for float64 inputs and
  float32 for every other float (bfloat16, float16, float32).
* :func:`dot`: a 2-D matmul with float32 accumulation; float32 operands at HIGHEST precision
  unless told otherwise.
* :func:`soft_cap`: the logits soft cap ``cap * tanh(s / cap)`` (Gemma 2).
* :func:`softplus`, :func:`silu_and_grad`: elementwise, in the dtype of their input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Contracting dims (of a, of b) for :func:`dot` on 2-D operands.
NN = (1, 0)  # a @ b
NT = (1, 1)  # a @ b.T
TN = (0, 0)  # a.T @ b
# :func:`dot`'s default precision: HIGHEST when the first operand is float32, the backend's
# default otherwise (bfloat16 / float16 operands are exact on the MXU and tensor cores).
HIGHEST_FOR_FLOAT32 = "highest_for_float32"


def gpu_float32_precision(interpret: bool):
  """Precision of a Triton kernel's dots on float32 operands.

  Compiled: three TF32 passes with float32 accumulation (float32 accuracy on the tensor cores,
  where one TF32 pass, the GPU's default, loses about three digits). Interpret mode runs on
  the host, which has no TF32 algorithm: ``HIGHEST``.
  """
  return lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def compute_dtype(*arrays) -> jnp.dtype:
  """float64 when any of ``arrays`` is float64, else float32 (``None`` entries are skipped).

  The dtype in which references, XLA paths and kernel accumulators compute: inputs of any
  lower precision (bfloat16, float16, float32) accumulate in float32.
  """
  if any(a is not None and a.dtype == jnp.float64 for a in arrays):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def dot(a, b, dims=NN, *, precision=HIGHEST_FOR_FLOAT32):
  """``lax.dot_general`` of 2-D ``a`` and ``b`` with float32 accumulation (float32 result).

  Args:
    a, b: 2-D arrays, e.g. [m, k] and [k, n] for ``dims=NN``.
    dims: (contracting dim of a, contracting dim of b): :data:`NN` (a @ b, the default),
      :data:`NT` (a @ b.T) or :data:`TN` (a.T @ b).
    precision: :data:`HIGHEST_FOR_FLOAT32` (default): ``lax.Precision.HIGHEST`` when ``a`` is
      float32 (IEEE float32 products, not bf16 passes or TF32), the default precision
      otherwise; or any ``precision`` that ``lax.dot_general`` takes (``None`` for the
      backend's default whatever the dtype).

  Returns:
    float32 [m, n].
  """
  if isinstance(precision, str) and precision == HIGHEST_FOR_FLOAT32:
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  contract_a, contract_b = dims
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def soft_cap(logits, cap):
  """``cap * tanh(logits / cap)`` (the logits soft cap), or ``logits`` when ``cap`` is None.

  ``logits``: any shape and float dtype (the result keeps it); ``cap``: a Python float.
  """
  if cap is None:
    return logits
  return cap * jnp.tanh(logits / cap)


def softplus(x):
  """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)); same shape and dtype.

  No expm1 or logaddexp: the Mosaic lowering lacks expm1."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def silu_and_grad(z):
  """(silu(z), silu'(z)) = (z σ(z), σ(z) (1 + z (1 - σ(z)))), elementwise, in z's dtype."""
  sig = jax.nn.sigmoid(z)
  return z * sig, sig * (1.0 + z * (1.0 - sig))
