"""Compile-only Mosaic builds of the TPU kernels through a libtpu wheel (no TPU needed).

``jax.export`` (the lowering tests) stops at the Pallas -> Mosaic lowering; compiling for a
compile-only TPU topology also runs Mosaic's own passes (layouts, VMEM allocation), which
reject what plain lowering lets through. Set ``LCLM_LIBTPU_PATH`` to a libtpu.so to run
these tests; without it they are skipped.

A test module defines ``tpu_programs(case) -> [(label, fn, args)]``: the functions to
compile (forward, gradient, ...) and their argument pytrees of ``jax.ShapeDtypeStruct``
(None leaves allowed). :func:`compile_programs` compiles every program of every case for
every topology in a fresh process (libtpu must be found when jax starts) and returns the
labels it compiled, with the compile time of each. :func:`memory_analyses` compiles the
same programs and returns the TPU compiler's memory plan of each (``compiled.memory_analysis()``:
argument, output and temporary HBM bytes), to hold a kernel's temporaries to a budget.
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

_PROGRAMS = """
import importlib, time
import jax
from jax.experimental import topologies
from pallas_kernels._common import dispatch

module = importlib.import_module({module!r})

def compiled_programs():
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
          compiled = jax.jit(fn).lower(*args).compile()
        yield name, case, label, compiled, time.perf_counter() - start
"""

_SCRIPT = _PROGRAMS + """
for name, case, label, _, seconds in compiled_programs():
  print(f"compiled {{name}} {{case}} {{label}} {{seconds:.1f}}s", flush=True)
"""

_MEMORY_SCRIPT = _PROGRAMS + """
for name, case, label, compiled, _ in compiled_programs():
  stats = compiled.memory_analysis()
  print(f"memory {{name}} {{case}} {{label}} argument={{stats.argument_size_in_bytes}} "
        f"output={{stats.output_size_in_bytes}} temp={{stats.temp_size_in_bytes}}",
        flush=True)
"""


def _run_script(script, module, cases, topologies, timeout):
  env = dict(os.environ, TPU_LIBRARY_PATH=os.environ[LIBTPU_ENV], JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.dirname(os.path.abspath(__file__)),
                                         os.environ.get("PYTHONPATH", "")]))
  code = textwrap.dedent(script).format(module=module, topologies=tuple(topologies),
                                        cases=tuple(cases))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
  return proc.stdout.splitlines()


def memory_analyses(module: str, cases, *, topologies=("v5e:2x2",), timeout: int = 900):
  """{(topology, case, label): {"argument": bytes, "output": bytes, "temp": bytes}}: the
  compiled memory plan of every program of ``module.tpu_programs(case)`` (one fresh process).
  """
  plans = {}
  for line in _run_script(_MEMORY_SCRIPT, module, cases, topologies, timeout):
    if line.startswith("memory "):
      _, topology, case, label, *fields = line.split()
      plans[(topology, case, label)] = {
          key: int(value) for key, value in (f.split("=") for f in fields)}
  return plans


def compile_programs(module: str, cases, *, topologies=TOPOLOGIES, timeout: int = 900):
  """Compiles ``module.tpu_programs(case)`` for every case and topology; returns the
  "compiled <topology> <case> <label> <seconds>" lines (the test asserts on them)."""
  return [line for line in _run_script(_SCRIPT, module, cases, topologies, timeout)
          if line.startswith("compiled ")]
