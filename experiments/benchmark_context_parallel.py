"""Per-device memory of context-parallel attention as the context axis grows (T fixed).

    python -m experiments.benchmark_context_parallel [--seq-len 16384] [--devices 1,2,4,8]
        [--strategies ring,all_gather,ulysses] [--load-balances none,zigzag,striped]
        [--batch 1] [--heads 8] [--kv-heads 8] [--head-dim 64] [--dtype float32]
        [--window W] [--out benchmarks/results/context_parallel_memory.json]

For every number of devices P the measurement runs in a fresh Python with P fake CPU devices
(``--xla_force_host_platform_device_count``, read when jax starts), on a 1-D mesh
("context",): the forward and the backward pass (all of dq, dk, dv) of causal
:func:`pallas_kernels.context_parallel_attention` on [batch, T, heads, head_dim] arrays
sharded over the sequence, inputs, cotangent and outputs alike. It is compiled, not run:
the figure is the per-device compiled peak of XLA's buffer assignment (arguments + outputs
+ temporaries - aliased bytes of the SPMD-partitioned program, which is one device's
program), so T can exceed what this machine could run in reasonable time. P = 1 adds the
single-device ``flash_attention`` (XLA path) as a reference row.

The table gives each (strategy, load balance) its peak per device and the ratio to its own
P = 1 figure; O(T/P) memory halves with every doubling of P. The JSON holds the rows, the
environment and the exact command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("ring", "all_gather", "ulysses")
LOAD_BALANCES = ("none", "zigzag", "striped")
MIB = 2 ** 20


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq-len", type=int, default=16384)
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--strategies", default=",".join(STRATEGIES))
  parser.add_argument("--load-balances", default=",".join(LOAD_BALANCES))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--window", type=int, default=None,
                      help="causal sliding window (keys c - W ... c); default full causal")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                    "context_parallel_memory.json"))
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.devices = [int(p) for p in args.devices.split(",")]
  args.strategies = args.strategies.split(",")
  args.load_balances = args.load_balances.split(",")
  for s in args.strategies:
    if s not in STRATEGIES:
      parser.error(f"--strategies: {s!r} is not one of {STRATEGIES}")
  for lb in args.load_balances:
    if lb not in LOAD_BALANCES:
      parser.error(f"--load-balances: {lb!r} is not one of {LOAD_BALANCES}")
  return args


def _configs(args):
  for strategy in args.strategies:
    for lb in args.load_balances:
      if strategy == "all_gather" and lb == "striped":
        continue  # Not supported (context_parallel_attention says so).
      yield strategy, None if lb == "none" else lb


def _worker(args) -> list[dict]:
  """Runs in the child with ``args.worker`` fake devices: one row per configuration."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from experiments import benchmarking
  from pallas_kernels import context_parallel_attention, flash_attention

  p = args.worker
  if jax.device_count() != p:
    raise RuntimeError(f"worker for P={p} sees {jax.device_count()} devices")
  mesh = Mesh(np.array(jax.devices()), ("context",))
  seq = NamedSharding(mesh, PartitionSpec(None, "context"))
  dtype = jnp.dtype(args.dtype)
  b, t, h, hk, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
  shapes = [(b, t, h, d), (b, t, hk, d), (b, t, hk, d), (b, t, h, d)]  # q, k, v, d_out
  inputs = [jax.ShapeDtypeStruct(s, dtype, sharding=seq) for s in shapes]
  window = None if args.window is None else (args.window, 0)
  rows = []

  def measure(name, strategy, lb, forward):
    program = benchmarking.forward_and_backward(forward)
    row = dict(strategy=strategy, load_balance=lb or "none", devices=p, seq_len=t, batch=b,
               heads=h, kv_heads=hk, head_dim=d, dtype=args.dtype, window=args.window,
               name=name)
    try:
      compiled = jax.jit(program, in_shardings=(seq,) * 4,
                         out_shardings=(seq,) * 4).lower(*inputs).compile()
      stats = compiled.memory_analysis()
      row.update(status="ok", peak_mib=benchmarking.compiled_memory_bytes(compiled) / MIB,
                 argument_mib=stats.argument_size_in_bytes / MIB,
                 output_mib=stats.output_size_in_bytes / MIB,
                 temp_mib=stats.temp_size_in_bytes / MIB)
    except ValueError as error:  # A configuration the op rejects (e.g. Ulysses heads).
      row.update(status="rejected", note=str(error).splitlines()[0][:300])
    rows.append(row)
    print(json.dumps(row), flush=True)

  if p == 1:
    measure("flash_attention (one device)", "flash", None, lambda q, k, v: flash_attention(
        q, k, v, is_causal=True, local_window_size=window, implementation="xla"))
  for strategy, lb in _configs(args):
    measure(f"{strategy} {lb or 'contiguous'}", strategy, lb,
            lambda q, k, v, strategy=strategy, lb=lb: context_parallel_attention(
                q, k, v, mesh=mesh, strategy=strategy, load_balance=lb, is_causal=True,
                local_window_size=window, implementation="xla"))
  return rows


def _run_worker(argv, p) -> list[dict]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={p}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_context_parallel", *argv, "--worker",
       str(p)], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"the P={p} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _add_ratios(rows):
  base = {(r["strategy"], r["load_balance"]): r["peak_mib"] for r in rows
          if r["devices"] == 1 and r["status"] == "ok"}
  for r in rows:
    ref = base.get((r["strategy"], r["load_balance"]))
    r["ratio_to_p1"] = (r["peak_mib"] / ref if r["status"] == "ok" and ref else None)
    r["ideal_ratio"] = 1.0 / r["devices"]


def format_table(rows) -> str:
  header = ("strategy", "load balance", "P", "peak MiB/device", "ratio to P=1", "1/P",
            "args MiB", "temp MiB")
  lines = []
  for r in rows:
    if r["status"] != "ok":
      lines.append((r["strategy"], r["load_balance"], str(r["devices"]), r["status"], "", "",
                    "", r.get("note", "")[:60]))
      continue
    ratio = "" if r["ratio_to_p1"] is None else f"{r['ratio_to_p1']:.3f}"
    lines.append((r["strategy"], r["load_balance"], str(r["devices"]), f"{r['peak_mib']:,.1f}",
                  ratio, f"{r['ideal_ratio']:.3f}", f"{r['argument_mib']:,.1f}",
                  f"{r['temp_mib']:,.1f}"))
  widths = [max(len(x[i]) for x in lines + [header]) for i in range(len(header))]
  fmt = lambda row: " | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
  return "\n".join([fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(x) for x in lines])


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parse(argv)
  if args.worker is not None:
    _worker(args)
    return 0
  rows = []
  for p in args.devices:
    rows += _run_worker(argv, p)
  order = {s: i for i, s in enumerate(("flash",) + STRATEGIES)}
  rows.sort(key=lambda r: (order[r["strategy"]], LOAD_BALANCES.index(r["load_balance"]),
                           r["devices"]))
  _add_ratios(rows)
  table = format_table(rows)
  print(f"Per-device compiled peak memory, forward + backward, causal"
        f"{'' if args.window is None else f' window {args.window}'}, T={args.seq_len}, "
        f"B={args.batch}, H={args.heads}, Hk={args.kv_heads}, D={args.head_dim}, "
        f"{args.dtype}, fake CPU devices:\n{table}")
  import jax  # Only for the versions (the parent never creates devices it does not need).
  import jaxlib
  result = dict(rows=rows, metadata=dict(
      command="python -m experiments.benchmark_context_parallel " + shlex.join(argv),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
      platform="cpu (fake devices)", host_cpu_count=os.cpu_count()))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
