"""Picks the implementation of a kernel at call time from the platform of its inputs.

Every public op takes ``implementation=None | "pallas" | "interpret" | "xla" | "reference"``:

* ``None``: compiled Pallas on TPU and GPU, the blockwise XLA path elsewhere (CPU);
* ``"pallas"``: compiled Pallas; only on TPU or GPU;
* ``"interpret"``: the Pallas kernels run by the Pallas interpreter, on any platform (slow;
  for tests and debugging);
* ``"xla"``: the blockwise pure-JAX path, on any platform;
* ``"reference"``: the naive math, on any platform.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from types import ModuleType

import jax

IMPLEMENTATIONS = (None, "pallas", "interpret", "xla", "reference")
PALLAS_PLATFORMS = ("tpu", "gpu")
_TARGET_PLATFORM = contextvars.ContextVar("lclm_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str, *, device_kind: str | None = None):
  """Trace ops for ``platform`` ("tpu", "gpu" or "cpu") whatever this host runs.

  For ahead-of-time lowering, e.g. ``jax.export(..., platforms=["cuda"])`` on a CPU machine:
  inside the block, ops pick the kernels of ``platform`` instead of the host's. GPU kernels
  are lowered for ``device_kind`` (default "NVIDIA H100") when the host has no GPU, through
  an abstract device, which the Triton lowering of jax >= 0.11 needs to pick its target.
  """
  platform = _normalise(platform)
  if platform not in ("tpu", "gpu", "cpu"):
    raise ValueError(f"target_platform: platform must be 'tpu', 'gpu' or 'cpu', got {platform!r}.")
  token = _TARGET_PLATFORM.set(platform)
  try:
    with contextlib.ExitStack() as stack:
      if platform == "gpu" and (device_kind or _normalise(jax.default_backend()) != "gpu"):
        device = jax.sharding.AbstractDevice(
            device_kind=device_kind or "NVIDIA H100", num_cores=None, platform="gpu")
        # Auto axis: jax >= 0.11 makes an AbstractMesh's axes Explicit by default, which
        # would give every traced value a sharding over this stand-in mesh.
        mesh = jax.sharding.AbstractMesh((1,), ("_target",),
                                         axis_types=(jax.sharding.AxisType.Auto,),
                                         abstract_device=device)
        stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
      yield
  finally:
    _TARGET_PLATFORM.reset(token)


def target_platform_active() -> bool:
  """True inside :func:`target_platform` (ahead-of-time lowering for another platform)."""
  return _TARGET_PLATFORM.get() is not None


def platform_of(*arrays) -> str:
  """Returns "tpu", "gpu" or "cpu": where the computation on ``arrays`` will run.

  Concrete arrays report the platform of their devices; under a trace (jit, grad) the
  arrays are abstract, so the default backend decides, as it does for the jitted program.
  Inside :func:`target_platform` that platform wins.
  """
  if _TARGET_PLATFORM.get() is not None:
    return _TARGET_PLATFORM.get()
  for x in arrays:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      try:
        devices = x.devices()
      except Exception:  # Deleted or otherwise unusable arrays: fall back to the default.
        continue
      if devices:
        return _normalise(next(iter(devices)).platform)
  return _normalise(jax.default_backend())


def _normalise(platform: str) -> str:
  platform = platform.lower()
  if platform in ("cuda", "rocm", "gpu"):
    return "gpu"
  return platform


def resolve_implementation(op_name: str, implementation: str | None, platform: str, *,
                           float64: bool = False) -> str:
  """Returns the concrete implementation to run, or raises a ValueError that says why not.

  ``float64``: the inputs are float64. The Pallas kernels compute in float32, so for them
  None picks "xla" and an explicit "pallas" or "interpret" raises.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"{op_name}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
    )
  if implementation is None:
    return "xla" if float64 or platform not in PALLAS_PLATFORMS else "pallas"
  if implementation == "pallas" and platform not in PALLAS_PLATFORMS:
    raise ValueError(
        f"{op_name}: implementation='pallas' needs a TPU or GPU, but the inputs are on "
        f"{platform!r}. Use implementation='interpret' to run the Pallas kernels in the "
        "interpreter, 'xla' for the blockwise path, or None to choose automatically."
    )
  if float64 and implementation in ("pallas", "interpret"):
    raise ValueError(f"{op_name}: float64 inputs run with implementation='xla' or 'reference' "
                     f"(or None, which picks 'xla' for them), got "
                     f"implementation={implementation!r}.")
  return implementation


def pallas_backend(platform: str) -> str:
  """The Pallas kernel family for ``platform``: "tpu" (Mosaic) or "gpu" (Triton).

  Interpret mode on a CPU runs the TPU kernels, the project's primary target.
  """
  return "gpu" if platform == "gpu" else "tpu"


BACKENDS = ("xla", "tpu", "gpu")


def backend_module(package: str, backend: str) -> ModuleType:
  """The module of ``package`` (e.g. "pallas_kernels.ssd") that implements ``backend``.

  ``backend`` is "xla", "tpu" or "gpu" (module ``xla.py``, ``tpu.py``, ``gpu.py``). Imported
  at call time, so that importing an op does not pull in the Pallas lowerings it may not use.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  return importlib.import_module(f"{package}.{backend}")
