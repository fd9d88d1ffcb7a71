"""Shared test set-up: hardware markers and the 8-fake-device subprocess helper."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

# Compiling is most of a tiny test's time. On a CPU-only machine (no CUDA plugin or libtpu
# installed, or JAX_PLATFORMS=cpu) XLA's CPU backend skips LLVM's expensive passes: the same
# HLO programs (no fast-math) compile faster; 21 of the slowest tests ran 1.2-1.6x faster.
# Set before jax starts its backend; LCLM_TEST_FULL_OPT=1 keeps the default optimization.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin")
if os.environ.get("LCLM_TEST_FULL_OPT") != "1" and (
    os.environ.get("JAX_PLATFORMS") == "cpu"
    or not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)):
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"]).strip()

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  if os.environ.get("LCLM_FAILURES_AT_ONCE") == "1":
    import failures_at_once  # pylint: disable=import-outside-toplevel  (tests/ is on the path)
    config.pluginmanager.register(failures_at_once, "lclm_failures_at_once")


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  skip_gpu = pytest.mark.skip(reason="needs a GPU (jax.default_backend() != 'gpu')")
  skip_tpu = pytest.mark.skip(reason="needs a TPU (jax.default_backend() != 'tpu')")
  for item in items:
    if "gpu" in item.keywords and backend != "gpu":
      item.add_marker(skip_gpu)
    if "tpu" in item.keywords and backend != "tpu":
      item.add_marker(skip_tpu)


def run_on_fake_devices(code: str, num_devices: int = 8, timeout: int = 600) -> str:
  """Runs ``code`` in a fresh Python with ``num_devices`` fake CPU devices; returns stdout.

  XLA reads the device count when jax initialises, so this needs its own process. The code
  should assert what it checks; a failure raises here with the child's output.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc.stdout


@pytest.fixture
def fake_devices():
  """``fake_devices(code)`` runs code on 8 fake CPU devices in a subprocess."""
  return run_on_fake_devices


@pytest.fixture(autouse=True)
def _clear_gin_config():
  """Gin bindings of one test never leak into the next (xdist workers run many tests)."""
  yield
  gin = sys.modules.get("gin")  # Not imported by kernel-only runs (make device-check).
  if gin is not None:
    gin.clear_config()


# Every compiled XLA:CPU executable maps about 15 memory regions that live as long as jax's
# caches hold it. A long-lived xdist worker compiles thousands of programs; at the kernel's
# per-process limit (vm.max_map_count, 65530 by default) the next mmap fails and LLVM crashes
# the worker inside `backend_compile_and_load` (a segfault in whichever test compiles then).
# Between test modules, a worker past a third of that limit drops jax's caches, which unmaps
# those executables; a program used again is compiled again.
_MAPS_PATH = "/proc/self/maps"


def _max_map_count() -> int:
  try:
    with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
      return int(f.read())
  except (OSError, ValueError):
    return 65530


_MAPS_LIMIT = _max_map_count() // 3


def _mapped_regions() -> int:
  with open(_MAPS_PATH, "rb") as f:
    return sum(1 for _ in f)


@pytest.fixture(autouse=True, scope="module")
def _bound_mapped_regions():
  """Keeps the worker's count of memory maps under a third of ``vm.max_map_count``."""
  yield
  if os.path.exists(_MAPS_PATH) and _mapped_regions() > _MAPS_LIMIT:
    jax.clear_caches()
