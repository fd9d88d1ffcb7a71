"""Tolerances and error measures shared by the kernel tests (GUIDE §4).

Both sides are upcast to float32 (float64 when either is float64) before comparing.
"""

from __future__ import annotations

import numpy as np

# quantity -> input dtype -> (kind, value, rtol). kind "abs": atol=value; kind "rrms": the
# relative RMS error rms(out - ref) / rms(ref) must stay under value.
TOLERANCES = {
    "attention_output": {"float32": ("abs", 2e-5, 1e-4), "bfloat16": ("abs", 3e-3, 1e-2)},
    "lse": {"float32": ("abs", 1e-5, 1e-5), "bfloat16": ("abs", 1e-3, 1e-3)},
    "dq": {"float32": ("abs", 1e-4, 1e-4), "bfloat16": ("rrms", 2e-2, None)},
    "dk": {"float32": ("abs", 1e-4, 1e-4), "bfloat16": ("rrms", 2e-2, None)},
    "dv": {"float32": ("abs", 1e-4, 1e-4), "bfloat16": ("rrms", 1e-2, None)},
    "recurrent": {"float32": ("rrms", 1e-5, None), "bfloat16": ("rrms", 5e-3, None)},
}


def _as_np(x):
  x = np.asarray(x)
  return x.astype(np.float64 if x.dtype == np.float64 else np.float32)


def relative_rms(out, ref) -> float:
  """rms(out - ref) / rms(ref); 0 when both are exactly zero."""
  out, ref = _as_np(out), _as_np(ref)
  num = float(np.sqrt(np.mean(np.square(out - ref)))) if out.size else 0.0
  den = float(np.sqrt(np.mean(np.square(ref)))) if ref.size else 0.0
  if den == 0.0:
    return 0.0 if num == 0.0 else float("inf")
  return num / den


def assert_close(quantity: str, dtype, out, ref, *, scale: float = 1.0, name: str = "") -> None:
  """Asserts ``out`` matches ``ref`` within the tolerance table row for ``quantity``.

  ``scale`` loosens the tolerance where a test has a written reason (e.g. long sums).
  """
  dtype_name = np.dtype(dtype).name if str(dtype) != "bfloat16" else "bfloat16"
  if dtype_name == "float64":
    dtype_name = "float32"
  if dtype_name == "float16":
    dtype_name = "bfloat16"
  kind, value, rtol = TOLERANCES[quantity][dtype_name]
  o, r = _as_np(out), _as_np(ref)
  label = f"{quantity}{' ' + name if name else ''} ({dtype_name})"
  assert o.shape == r.shape, f"{label}: shape {o.shape} != reference {r.shape}"
  assert np.all(np.isfinite(o) == np.isfinite(r)), f"{label}: non-finite values differ"
  finite = np.isfinite(r)
  if kind == "abs":
    np.testing.assert_allclose(
        o[finite], r[finite], atol=value * scale, rtol=rtol * scale, err_msg=label
    )
    np.testing.assert_array_equal(o[~finite], r[~finite], err_msg=label)
  else:
    err = relative_rms(o[finite], r[finite])
    assert err <= value * scale, f"{label}: relative RMS error {err:.3g} > {value * scale:.3g}"
