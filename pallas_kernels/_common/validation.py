"""Input checks that raise ValueErrors naming the argument, what it got and what it needs."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def check_rank(op_name: str, name: str, x, rank: int, layout: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{op_name}: {name} must be an array {layout}, got {type(x).__name__}.")
  if len(x.shape) != rank:
    raise ValueError(
        f"{op_name}: {name} must have rank {rank} {layout}, got shape {tuple(x.shape)}."
    )


def check_float_dtype(op_name: str, name: str, x) -> None:
  if not any(x.dtype == d for d in FLOAT_DTYPES):
    raise ValueError(
        f"{op_name}: {name} must be a floating dtype (float32, bfloat16, float16 or "
        f"float64), got {x.dtype}."
    )


def check_int_dtype(op_name: str, name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{op_name}: {name} must be an integer array, got dtype {x.dtype}.")


def check_same_dtype(op_name: str, names: Sequence[str], arrays: Sequence) -> None:
  dtypes = {str(a.dtype) for a in arrays}
  if len(dtypes) > 1:
    got = ", ".join(f"{n}={a.dtype}" for n, a in zip(names, arrays))
    raise ValueError(f"{op_name}: {', '.join(names)} must share one dtype, got {got}.")


def check_shape(op_name: str, name: str, x, expected: Sequence[int], layout: str) -> None:
  if tuple(x.shape) != tuple(expected):
    raise ValueError(
        f"{op_name}: {name} must have shape {tuple(expected)} {layout}, got {tuple(x.shape)}."
    )


def check_positive_int(op_name: str, name: str, value, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{op_name}: {name} must be a positive int, got {value!r}.")


def check_positive_float(op_name: str, name: str, value, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise ValueError(f"{op_name}: {name} must be a positive number, got {value!r}.")
  if not value > 0 or not np.isfinite(value):
    raise ValueError(f"{op_name}: {name} must be a positive finite number, got {value!r}.")
