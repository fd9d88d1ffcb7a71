"""``make device-check``: everything a first run on a GPU or TPU machine should do, in 8 minutes.

    python -m experiments.device_check [--out-dir benchmarks/results] [--budget-s 480]
        [--sizes 1024,4096,16384] [--kernels ...] [--test-files ...] [--no-install]
    python -m experiments.device_check --dry-run --out-dir DIR   # CPU, tiny sizes, no installs

Steps, each logged to ``<out-dir>/<device>_device_check.log`` (``<device>`` is the report's
platform slug: ``nvidia_h200``, ``tpu_v5_lite``, ``cpu``):

1. **Environment.** If the running Python's jax already sees a GPU or TPU, nothing is
   installed (a lent machine may have no network: its preinstalled jax, flax, pytest,
   hypothesis, torch are used as they are). Otherwise, on a machine with an NVIDIA GPU
   (``nvidia-smi``) or a TPU (``/dev/accel*``, ``/dev/vfio``), a virtual environment
   (``~/.cache/lclm/venv-device``, or ``$LCLM_DEVICE_VENV``) gets ``pip install -e
   ".[gpu,test]"`` (or ``.[tpu,test]``) and the next steps run in it (a later run reuses it
   when its jax sees the accelerator). ``--dry-run`` and ``--no-install`` never install.
2. **Accelerator tests.** ``pytest -m "gpu and not slow"`` (``tpu`` on a TPU) on the files of
   ``tests/pallas_kernels`` that carry the marker, with a time limit; files that fail to
   import are reported (``--continue-on-collection-errors``). ``tests/conftest.py`` needs
   only jax and pytest, so a machine without lclm's training dependencies (gin, grain, tfds)
   runs them as they are. No selected test is a result ("0 gpu tests selected"), not a
   failure. On a GPU host with pytest-xdist and 8+ cores they run in up to 4 processes
   (compiling, most of their time, is host work; the first H200 run got through 23 of 71
   tests in 166 s in one process). Each failure's traceback is printed when it happens
   (``tests/failures_at_once.py``), so a step stopped at its limit still says why.
3. **Peers.** Which peers the benchmark can compare with here, and why the others are
   skipped: cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``), jax's Pallas
   GPU attention and Mosaic-GPU attention, tokamax, flash-linear-attention and mamba_ssm
   (GPU); splash and jax's Pallas TPU flash attention (TPU).
4. **Kernel benchmark.** ``python -m experiments.benchmark_kernels --report <out-dir>`` at
   1K/4K/16K tokens, bf16, fwd and fwd_bwd, with a time budget (``--time-budget``: the
   rows left when it runs out say so, and the table is still written); with
   ``$LCLM_LIBTPU_PATH`` also ``--tpu-memory``. It writes ``<device>.md``, ``<device>.json``
   (and the plot when matplotlib is there). jax runs it with
   ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless set) so the PyTorch peers find memory.
5. **Summary.** A "Device check" section (environment, tests, peers, times, the exact
   commands) appended to ``<device>.md``, ``<device>_device_check.json``, and every output
   copied to ``$OUT`` when that variable is set (a lent machine returns only ``$OUT``).

The budget (``--budget-s``, default 480 s) is split as: tests at most 35% of what is left
(and 180 s), the benchmark what remains minus a reserve for the summary. ``--dry-run`` runs
the same flow on CPU (``JAX_PLATFORMS=cpu``) at 64 tokens, forward only, the XLA paths,
marker "gpu" (so its tests are selected and skipped, or none selected), and writes into
``--out-dir``; ``tests/experiments/test_device_check.py`` runs it.

This module imports neither jax nor lclm at import time: it may start under a Python that
has no jax yet (step 1 installs it), and every step runs in a subprocess of the Python that
step 1 chose.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join("benchmarks", "results")
# Outside the checkout (git need not ignore it); $LCLM_DEVICE_VENV overrides.
DEVICE_VENV = os.environ.get("LCLM_DEVICE_VENV") or os.path.join(
    os.path.expanduser("~"), ".cache", "lclm", "venv-device")
DEFAULT_BUDGET_S = 480.0
# Largest first: rows past the time budget are dropped, and the long rows matter most.
DEVICE_SIZES = "16384,4096,1024"
INSTALL_TIMEOUT_S = 240
DRY_RUN_SIZES = "64"
TEST_SHARE, TEST_MAX_S = 0.35, 180.0
MAX_TEST_WORKERS = 4
SUMMARY_RESERVE_S = 25.0
# Time the benchmark process needs besides its measured rows: start-up, the compile-only
# memory check and writing the report (and, with libtpu, the TPU compiler memory figures).
BENCH_OVERHEAD_S, TPU_MEMORY_S = 45.0, 120.0
_RESULT = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")

_PROBE = r"""
import json, os
out = {}
try:
  import jax
  d = jax.devices()[0]
  out.update(platform=d.platform, device_kind=d.device_kind, device_count=jax.device_count(),
             jax_version=jax.__version__)
except Exception as e:
  out["error"] = f"{type(e).__name__}: {e}"[:300]
import importlib.util
out["modules"] = {name: importlib.util.find_spec(name) is not None
                  for name in ("gin", "flax", "pytest", "hypothesis", "matplotlib", "xdist")}
print("PROBE " + json.dumps(out))
"""

# Peers: (name, kernels it is compared with, platform it needs, module to import or None).
PEERS = (
    ("cuDNN (jax.nn.dot_product_attention implementation='cudnn')",
     "flash_attention, decode_attention", "gpu", None),
    ("jax Pallas GPU attention", "flash_attention",
     "gpu", "jax.experimental.pallas.ops.gpu.attention"),
    ("jax Mosaic-GPU attention (sm90+)", "flash_attention",
     "gpu", "jax.experimental.pallas.ops.gpu.attention_mgpu"),
    ("jax Pallas GPU decode attention", "decode_attention",
     "gpu", "jax.experimental.pallas.ops.gpu.decode_attention"),
    ("tokamax (GPU)", "flash_attention", "gpu", "tokamax"),
    ("flash-linear-attention (chunk_simple_gla)", "ssd, lightning_attention",
     "gpu", "fla.ops.simple_gla"),
    ("mamba_ssm (mamba_chunk_scan_combined)", "ssd",
     "gpu", "mamba_ssm.ops.triton.ssd_combined"),
    ("mamba_ssm (selective_scan_fn)", "selective_scan",
     "gpu", "mamba_ssm.ops.selective_scan_interface"),
    ("jax Pallas TPU flash attention", "flash_attention",
     "tpu", "jax.experimental.pallas.ops.tpu.flash_attention"),
    ("jax splash attention", "flash_attention",
     "tpu", "jax.experimental.pallas.ops.tpu.splash_attention"),
    ("tokamax (TPU)", "flash_attention", "tpu", "tokamax"),
)

_PEER_PROBE = r"""
import importlib, json
out = {}
for module in %r:
  try:
    importlib.import_module(module)
    out[module] = ""
  except Exception as e:
    out[module] = f"not importable: {type(e).__name__}: {e}"[:200]
print("PEERS " + json.dumps(out))
"""


def platform_slug(platform: str, device_kind: str) -> str:
  """The report's file stem, as ``benchmark_kernels.platform_slug`` (which imports jax):
  "cpu" on CPU, else the device kind in lower case with other runs than [a-z0-9] as "_"."""
  if platform == "cpu":
    return "cpu"
  return re.sub(r"[^a-z0-9]+", "_", str(device_kind).lower()).strip("_") or "unknown_device"


class Log:
  """Prints and appends every line to the log file."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = open(path, "w", encoding="utf-8")  # pylint: disable=consider-using-with

    # A lent machine returns only $OUT, and a killed call returns what is there: mirror the
    # log into it line by line, so a run cut short still tells how far it got.
    out = os.environ.get("OUT")
    self._mirror = None
    if out:
      os.makedirs(out, exist_ok=True)
      self._mirror = open(os.path.join(out, "device_check_progress.log"), "w",  # pylint: disable=consider-using-with
                          encoding="utf-8")

  def __call__(self, text: str = "") -> None:
    print(text, flush=True)
    for f in (self._file, self._mirror):
      if f is not None:
        f.write(text + "\n")
        f.flush()

  def close(self) -> None:
    self._file.close()
    if self._mirror is not None:
      self._mirror.close()


def _env(dry_run: bool, share_gpu: bool = False) -> dict:
  """The steps' environment: the repository on the path; CPU for a dry run; with
  ``share_gpu``, jax allocates GPU memory as needed instead of taking 75% at start (the
  PyTorch peers of the benchmark need the rest), unless the caller set it."""
  env = dict(os.environ)
  if share_gpu:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  if dry_run:
    env["JAX_PLATFORMS"] = "cpu"
  return env


def probe(python: str, dry_run: bool) -> dict:
  """The device jax sees in ``python`` and which optional modules it has."""
  try:
    proc = subprocess.run([python, "-c", _PROBE], env=_env(dry_run), cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=180, check=False)
  except (OSError, subprocess.TimeoutExpired) as error:
    return dict(error=f"{type(error).__name__}: {error}", modules={})
  for line in proc.stdout.splitlines():
    if line.startswith("PROBE "):
      return json.loads(line[len("PROBE "):])
  return dict(error=f"probe exited {proc.returncode}: {proc.stderr.strip()[-300:]}", modules={})


def accelerator_hint() -> str | None:
  """"gpu" or "tpu" from the machine (not from jax): what to install; None if neither."""
  if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
    return "gpu"
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return "tpu"
  return None


def ensure_environment(args, log: Log) -> tuple[str, dict, dict]:
  """(python to run the steps with, its probe, what was done) -- step 1."""
  python = sys.executable
  found = probe(python, args.dry_run)
  done = dict(python=python, installed=None)
  if args.dry_run or found.get("platform") in ("gpu", "tpu"):
    reason = "dry run (CPU)" if args.dry_run else f"jax already sees {found['platform']}"
    log(f"[env] {reason}: no install; python {python}")
    return python, found, done
  hint = accelerator_hint()
  if args.no_install or hint is None:
    why = "--no-install" if args.no_install else "no GPU (nvidia-smi) or TPU (/dev/accel*) here"
    log(f"[env] jax sees {found.get('platform', found.get('error'))}; {why}: no install")
    return python, found, done
  venv = DEVICE_VENV
  venv_python = os.path.join(venv, "bin", "python")
  if os.path.exists(venv_python):  # A previous run's environment: reuse it when it works.
    again = probe(venv_python, args.dry_run)
    if again.get("platform") in ("gpu", "tpu"):
      log(f"[env] {DEVICE_VENV} from an earlier run sees {again['platform']}: no install")
      done.update(python=venv_python, installed=f"nothing ({DEVICE_VENV} reused)")
      return venv_python, again, done
  commands = []
  if not os.path.exists(venv_python):
    commands.append([python, "-m", "venv", venv])
  pip = ["-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "15"]
  commands.append([venv_python, *pip, "--upgrade", "pip"])
  commands.append([venv_python, *pip, "-e", f".[{hint},test]"])
  for command in commands:
    log(f"[env] $ {shlex.join(command)}")
    try:
      proc = subprocess.run(command, cwd=REPO_ROOT, text=True, capture_output=True,
                            check=False, timeout=INSTALL_TIMEOUT_S)
      failed = proc.returncode and f"({proc.returncode}): {proc.stderr.strip()[-800:]}"
    except subprocess.TimeoutExpired:
      failed = f"(no answer in {INSTALL_TIMEOUT_S} s: no network?)"
    if failed:
      log(f"[env] install failed {failed}")
      done["installed"] = f"failed: {shlex.join(command)}"
      return python, found, done
  done.update(python=venv_python, installed=f".[{hint},test] into {DEVICE_VENV}")
  found = probe(venv_python, args.dry_run)
  log(f"[env] installed {done['installed']}; jax sees {found.get('platform', found)}")
  return venv_python, found, done


# Files run first (the kernels least exercised on hardware); the rest follow by name.
FIRST_TEST_FILES = ("test_selective_scan_gpu_kernel.py", "test_flash_attention_mosaic_gpu.py",
                    "test_ssd.py", "test_lightning_attention.py", "test_selective_scan.py")


def marked_test_files(marker: str, root: str = REPO_ROOT) -> list[str]:
  """Test files of tests/pallas_kernels that use ``pytest.mark.<marker>`` (relative paths)."""
  pattern = re.compile(rf"mark\.{marker}\b")
  files = []
  for path in sorted(glob.glob(os.path.join(root, "tests", "pallas_kernels", "test_*.py"))):
    with open(path, encoding="utf-8") as f:
      if pattern.search(f.read()):
        files.append(os.path.relpath(path, root))
  first = {name: i for i, name in enumerate(FIRST_TEST_FILES)}
  return sorted(files, key=lambda f: first.get(os.path.basename(f), len(first)))


def parallel_test_workers(platform: str, modules: dict, dry_run: bool) -> int:
  """pytest-xdist workers for the accelerator tests: compiling is most of their time and runs
  on the host's cores, so a 16-core GPU host runs 4 at once (each allocating GPU memory as
  it needs); 0 (one process) on a TPU (one process owns it), without xdist, on a small host
  or in a dry run."""
  if dry_run or platform != "gpu" or not modules.get("xdist"):
    return 0
  workers = min(MAX_TEST_WORKERS, (os.cpu_count() or 1) // 4)
  return workers if workers > 1 else 0


def run_tests(python: str, marker: str, files: list[str], *, timeout: float, dry_run: bool,
              log: Log, workers: int = 0) -> dict:
  """Step 2: the marked tests, not slow, within ``timeout`` seconds (``workers`` > 1: that many
  pytest-xdist processes). Returns counts and the status: "passed", "failed",
  "none selected", "timed out" or "not run"."""
  command = [python, "-m", "pytest", "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider",
             "-m", f"{marker} and not slow", "--continue-on-collection-errors"]
  if workers > 1:
    command += ["-n", str(workers)]
  command += files
  result = dict(marker=marker, files=files, command=shlex.join(command),
                counts={}, seconds=0.0)
  if not files:
    result.update(status="none selected",
                  summary=f"0 {marker} tests selected: no test file carries the marker")
    log(f"[tests] {result['summary']}")
    return result
  if timeout < 5:
    result.update(status="not run", summary="no time left for the tests")
    log(f"[tests] {result['summary']}")
    return result
  log(f"[tests] $ {result['command']}  (limit {timeout:.0f} s)")
  start = time.monotonic()
  # pylint: disable-next=consider-using-with
  env = _env(dry_run, share_gpu=workers > 1)
  env["LCLM_FAILURES_AT_ONCE"] = "1"  # tracebacks as failures happen: a timeout keeps them
  proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
    timed_out = False
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the xdist workers too
    out, _ = proc.communicate()
    timed_out = True
  result["seconds"] = round(time.monotonic() - start, 1)
  lines = (out or "").splitlines()
  for line in lines:
    log(f"  {line}")
  counts: dict[str, int] = {}
  for line in lines:
    if "::" in line:
      match = _RESULT.search(line)
      if match:
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  result["counts"] = counts
  summary = next((line.strip("= ") for line in reversed(lines)
                  if re.search(r"\b(passed|failed|skipped|deselected|error|no tests ran)\b",
                               line) and line.startswith("=")), "")
  if timed_out:
    status = "timed out"
    summary = f"stopped after {timeout:.0f} s: " + ", ".join(
        f"{n} {k.lower()}" for k, n in sorted(counts.items())) if counts else (
        f"stopped after {timeout:.0f} s before any result")
  elif proc.returncode == 5 or (proc.returncode == 0 and not counts):
    status = "none selected"
    summary = f"0 {marker} tests selected ({summary or 'no tests ran'})"
  elif proc.returncode == 0:
    status = "passed"
  else:
    status = "failed"
  result.update(status=status, summary=summary, returncode=proc.returncode)
  log(f"[tests] {status}: {summary} ({result['seconds']} s)")
  return result


def probe_peers(python: str, platform: str, dry_run: bool, log: Log) -> list[dict]:
  """Step 3: every peer of :data:`PEERS`, available here or skipped with the reason."""
  modules = tuple(m for _, _, need, m in PEERS if m and need == platform)
  found = {}
  if modules:
    try:
      proc = subprocess.run([python, "-c", _PEER_PROBE % (modules,)], cwd=REPO_ROOT,
                            env=_env(dry_run), text=True, capture_output=True, timeout=180,
                            check=False)
      for line in proc.stdout.splitlines():
        if line.startswith("PEERS "):
          found = json.loads(line[len("PEERS "):])
    except (OSError, subprocess.TimeoutExpired) as error:
      found = {m: f"probe failed: {error}" for m in modules}
  peers = []
  for name, kernels, need, module in PEERS:
    if need != platform:
      reason = f"skipped: needs a {need.upper()} (this run: {platform})"
    elif module is None:
      reason = ""
    else:
      reason = found.get(module, "skipped: not probed")
      reason = f"skipped: {reason}" if reason else ""
    peers.append(dict(name=name, kernels=kernels, module=module, available=not reason,
                      reason=reason))
    log(f"[peers] {name} ({kernels}): {'available' if not reason else reason}")
  return peers


def run_benchmark(python: str, args, *, out_dir: str, budget: float, log: Log,
                  tpu_memory: bool) -> dict:
  """Step 4: ``benchmark_kernels --report`` with ``--time-budget``; returns the command,
  exit code, seconds and the report paths."""
  rows_budget = max(5.0, budget - BENCH_OVERHEAD_S - (TPU_MEMORY_S if tpu_memory else 0.0))
  command = [python, "-m", "experiments.benchmark_kernels", "--report", out_dir,
             "--sizes", args.sizes, "--modes", args.modes, "--warmup", "1",
             "--repeats", str(args.repeats), "--time-budget", f"{rows_budget:.0f}"]
  if args.kernels:
    command += ["--kernels", args.kernels]
  if args.no_plot:
    command.append("--no-plot")
  if args.dry_run:
    command.append("--quick")  # No memory check at 16K: a dry run stays small.
  else:
    command += ["--dtype", "bfloat16"]
  if tpu_memory:
    command.append("--tpu-memory")
  result = dict(command=shlex.join(command), rows_budget_s=round(rows_budget),
                limit_s=round(budget))
  log(f"[bench] $ {result['command']}  (limit {budget:.0f} s)")
  start = time.monotonic()
  # pylint: disable-next=consider-using-with
  proc = subprocess.Popen(command, cwd=REPO_ROOT, text=True,
                          env=_env(args.dry_run, share_gpu=not args.dry_run),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  # Its own --time-budget should end it in time; a program that hangs is killed 30 s past
  # the limit (the report is then missing, and the summary says so).
  watchdog = threading.Timer(budget + 30, proc.kill)
  watchdog.start()
  try:
    for line in proc.stdout:
      log(f"  {line.rstrip()}")
    proc.wait()
  finally:
    watchdog.cancel()
  if proc.returncode is not None and proc.returncode < 0:
    log(f"[bench] killed {budget + 30:.0f} s after it started (past its limit)")
  result.update(returncode=proc.returncode, seconds=round(time.monotonic() - start, 1))
  log(f"[bench] exit {proc.returncode} after {result['seconds']} s")
  return result


def format_summary(summary: dict) -> str:
  """The "Device check" section appended to the report markdown."""
  env, tests, bench = summary["environment"], summary["tests"], summary["benchmark"]
  lines = ["", "## Device check", "",
           f"- Command: `{summary['command']}` ({summary['date']}; "
           f"{summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget)",
           f"- Environment: {env['platform']} ({env['device_kind']}), jax "
           f"{env.get('jax_version', '?')}; python `{env['python']}`; installed: "
           f"{env['installed'] or 'nothing'}",
           f"- Tests (`-m \"{tests['marker']} and not slow\"`, {len(tests['files'])} files, "
           f"{tests['seconds']} s): **{tests['status']}**: {tests['summary']}",
           f"  - `{tests.get('command', '')}`",
           f"- Benchmark ({bench.get('seconds', '-')} s, exit {bench.get('returncode', '-')}): "
           f"`{bench.get('command', '')}`", "", "| peer | compared with | status |",
           "|---|---|---|"]
  for peer in summary["peers"]:
    status = "available" if peer["available"] else peer["reason"].replace("|", "\\|")
    lines.append(f"| {peer['name']} | {peer['kernels']} | {status} |")
  return "\n".join(lines) + "\n"


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m experiments.device_check",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="CPU, tiny sizes, XLA paths, no installs (writes into --out-dir)")
  parser.add_argument("--out-dir", default=None,
                      help=f"where the report, JSON and log go (default {RESULTS_DIR})")
  parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                      help="seconds for the whole check (default 480)")
  parser.add_argument("--sizes", default=None, help=f"benchmark lengths (default "
                      f"{DEVICE_SIZES}; dry run {DRY_RUN_SIZES})")
  parser.add_argument("--modes", default=None,
                      help="benchmark modes (default fwd,fwd_bwd; dry run fwd)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per program")
  parser.add_argument("--kernels", default=None,
                      help="benchmark only these kernels (comma-separated; default all)")
  parser.add_argument("--test-files", default=None,
                      help="comma-separated test files instead of the marked ones of "
                      "tests/pallas_kernels")
  parser.add_argument("--no-install", action="store_true", help="never pip install")
  parser.add_argument("--no-plot", action="store_true",
                      help="report without the PNG plot (no matplotlib import)")
  args = parser.parse_args(argv)
  if not args.budget_s > 0:
    parser.error(f"--budget-s must be positive, got {args.budget_s}")
  args.sizes = args.sizes or (DRY_RUN_SIZES if args.dry_run else DEVICE_SIZES)
  args.modes = args.modes or ("fwd" if args.dry_run else "fwd,fwd_bwd")
  args.out_dir = args.out_dir or os.path.join(REPO_ROOT, RESULTS_DIR)
  return args


def main(argv: list[str] | None = None) -> int:
  """Runs the check; returns 0 when the benchmark wrote its report and no test failed."""
  argv = sys.argv[1:] if argv is None else argv
  args = _parse_args(argv)
  start = time.monotonic()
  left = lambda: args.budget_s - (time.monotonic() - start)
  out_dir = os.path.abspath(args.out_dir)
  os.makedirs(out_dir, exist_ok=True)
  pending = os.path.join(out_dir, "device_check.log")
  log = Log(pending)
  log(f"device check: {'dry run, ' if args.dry_run else ''}budget {args.budget_s:.0f} s, "
      f"out {out_dir}")
  python, found, done = ensure_environment(args, log)
  platform = found.get("platform", "unknown")
  if not args.dry_run and platform not in ("gpu", "tpu"):
    log(f"[env] no GPU or TPU for jax here ({found.get('error') or platform}); the kernel "
        "tests and benchmark still run, on this platform")
  slug = platform_slug(platform, found.get("device_kind", "unknown"))
  log(f"[env] {platform} ({found.get('device_kind')}), jax {found.get('jax_version')}; "
      f"report stem {slug}")

  marker = "tpu" if platform == "tpu" else "gpu"
  files = ([f for f in args.test_files.split(",") if f] if args.test_files
           else marked_test_files(marker))
  tests = run_tests(python, marker, files, dry_run=args.dry_run,
                    timeout=min(TEST_MAX_S, TEST_SHARE * left()), log=log,
                    workers=parallel_test_workers(platform, found.get("modules") or {},
                                                  args.dry_run))
  peers = probe_peers(python, platform, args.dry_run, log)
  libtpu = os.environ.get("LCLM_LIBTPU_PATH")
  bench = run_benchmark(python, args, out_dir=out_dir, budget=max(10.0, left() -
                                                                   SUMMARY_RESERVE_S),
                        log=log, tpu_memory=bool(libtpu) and not args.dry_run)
  md_path, json_path = (os.path.join(out_dir, f"{slug}.{ext}") for ext in ("md", "json"))
  bench["report"] = md_path if os.path.exists(md_path) else None
  summary = dict(
      command="python -m experiments.device_check " + shlex.join(argv),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      budget_s=args.budget_s, seconds=round(time.monotonic() - start, 1), dry_run=args.dry_run,
      environment=dict(platform=platform, device_kind=found.get("device_kind"),
                       jax_version=found.get("jax_version"), modules=found.get("modules"),
                       **done),
      tests=tests, peers=peers, benchmark=bench)
  if bench["report"]:
    with open(md_path, "a", encoding="utf-8") as f:
      f.write(format_summary(summary))
  else:
    log(f"[bench] no report at {md_path}")
  summary_path = os.path.join(out_dir, f"{slug}_device_check.json")
  with open(summary_path, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  log(f"[done] {summary['seconds']:.0f} s; tests {tests['status']}; report "
      f"{bench['report']}")
  log.close()
  log_path = os.path.join(out_dir, f"{slug}_device_check.log")
  os.replace(pending, log_path)
  _copy_out([md_path, json_path, summary_path, log_path,
             os.path.join(out_dir, f"{slug}_time_memory.png")])
  ok = bench["report"] is not None and bench.get("returncode") == 0
  return 0 if ok and tests["status"] not in ("failed",) else 1


def _copy_out(paths: list[str]) -> None:
  """Copies the outputs that exist to ``$OUT`` (the lent machine returns only that folder)."""
  out = os.environ.get("OUT")
  if not out:
    return
  os.makedirs(out, exist_ok=True)
  for path in paths:
    target = os.path.join(out, os.path.basename(path))
    if os.path.exists(path) and not (os.path.exists(target) and os.path.samefile(path, target)):
      shutil.copy2(path, target)


if __name__ == "__main__":
  sys.exit(main())
