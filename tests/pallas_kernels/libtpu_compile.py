"""Compile-only Mosaic builds of the TPU kernels through a libtpu wheel (no TPU needed).

``jax.export`` (the lowering tests) stops at the Pallas -> Mosaic lowering; compiling for a
compile-only TPU topology also runs Mosaic's own passes (layouts, VMEM allocation), which
reject what plain lowering lets through. Set ``LCLM_LIBTPU_PATH`` to a libtpu.so to run
these tests; without it they are skipped.

A test module defines ``tpu_programs(case) -> [(label, fn, args)]``: the functions to
compile (forward, gradient, ...) and their argument pytrees of ``jax.ShapeDtypeStruct``
(None leaves allowed). :func:`compile_programs` compiles every program of every case for
every topology in a fresh process (libtpu must be found when jax starts) and returns the
labels it compiled, with the compile time of each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

LIBTPU_ENV = "LCLM_LIBTPU_PATH"
TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v6e:2x2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

requires_libtpu = pytest.mark.skipif(
    not os.environ.get(LIBTPU_ENV),
    reason=f"set {LIBTPU_ENV} to a libtpu.so to compile the TPU kernels with Mosaic")

_SCRIPT = """
import importlib, time
import jax
from jax.experimental import topologies
from pallas_kernels._common import dispatch

module = importlib.import_module({module!r})
for name in {topologies!r}:
  topology = topologies.get_topology_desc(platform="tpu", topology_name=name)
  mesh = jax.sharding.Mesh([topology.devices[0]], ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  place = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated)
  for case in {cases!r}:
    for label, fn, args in module.tpu_programs(case):
      args = jax.tree.map(place, args)
      start = time.perf_counter()
      with dispatch.target_platform("tpu"):
        jax.jit(fn).lower(*args).compile()
      print(f"compiled {{name}} {{case}} {{label}} {{time.perf_counter() - start:.1f}}s",
            flush=True)
"""


def compile_programs(module: str, cases, *, topologies=TOPOLOGIES, timeout: int = 900):
  """Compiles ``module.tpu_programs(case)`` for every case and topology; returns the
  "compiled <topology> <case> <label> <seconds>" lines (the test asserts on them)."""
  env = dict(os.environ, TPU_LIBRARY_PATH=os.environ[LIBTPU_ENV], JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.dirname(os.path.abspath(__file__)),
                                         os.environ.get("PYTHONPATH", "")]))
  code = textwrap.dedent(_SCRIPT).format(module=module, topologies=tuple(topologies),
                                         cases=tuple(cases))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
  return [line for line in proc.stdout.splitlines() if line.startswith("compiled ")]
