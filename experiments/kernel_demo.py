"""A one-minute kernel demo: flash attention against the naive reference, on any machine.

    python -m experiments.kernel_demo [--seq-len 2048] [--repeats 3]

For causal self-attention of random float32 inputs it reports, for the default
implementation (compiled Pallas on TPU/GPU, the blockwise XLA path on CPU) and the naive
O(T^2) reference: the largest absolute error of the output and of dQ, dK, dV (judged by the
project's tolerance table), the median time of forward + backward, and the compiled peak
memory with the ratio. Exits non-zero when an error is over its tolerance.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarking
from pallas_kernels import flash_attention
from pallas_kernels._common.testing import TOLERANCES, assert_close

QUANTITIES = ("attention_output", "dq", "dk", "dv")
IMPLEMENTATIONS = {"flash attention (default)": None, "naive reference": "reference"}


def _program(implementation):
  """``(q, k, v, d_out) -> (out, dq, dk, dv)`` for causal attention with ``implementation``."""
  return benchmarking.forward_and_backward(
      lambda q, k, v: flash_attention(q, k, v, is_causal=True, implementation=implementation))


def run(seq_len: int = 2048, *, batch: int = 1, heads: int = 8, head_dim: int = 64,
        repeats: int = 3, seed: int = 0) -> tuple[bool, str]:
  """Runs the demo at [batch, seq_len, heads, head_dim], float32, causal.

  Returns (every error within tolerance, the printable report).
  """
  shape = (batch, seq_len, heads, head_dim)
  inputs = [jax.random.normal(key, shape, jnp.float32)
            for key in jax.random.split(jax.random.key(seed), 4)]  # q, k, v, d_out
  results, seconds, memory = {}, {}, {}
  for name, implementation in IMPLEMENTATIONS.items():
    compiled = benchmarking.compile_fn(_program(implementation), *inputs)
    results[name] = [np.asarray(x) for x in compiled(*inputs)]
    seconds[name] = benchmarking.time_fn(compiled, *inputs, warmup=1, repeats=repeats)
    memory[name] = benchmarking.compiled_memory_bytes(compiled)

  ours, reference = (results[name] for name in IMPLEMENTATIONS)
  default = "xla" if jax.default_backend() == "cpu" else "pallas"
  lines = [f"flash attention kernel demo on {jax.devices()[0].device_kind} "
           f"(default implementation: {default}), jax {jax.__version__}",
           f"  causal self-attention, float32, [batch, len, heads, head_dim] = {list(shape)}",
           "", "  max |ours - reference| (tolerance: float32 row of the test table)"]
  passed = True
  for quantity, out, ref in zip(QUANTITIES, ours, reference):
    error = float(np.max(np.abs(out - ref)))
    _, atol, rtol = TOLERANCES[quantity]["float32"]
    try:
      assert_close(quantity, jnp.float32, out, ref)
      verdict = "ok"
    except AssertionError:
      passed, verdict = False, "FAIL"
    lines.append(f"    {quantity:<17} {error:9.2e}   (atol {atol:.0e}, rtol {rtol:.0e})  "
                 f"{verdict}")

  lines += ["", f"  {'forward + backward':<28} {'median ms':>10} {'compiled peak MiB':>18}"]
  for name in IMPLEMENTATIONS:
    lines.append(f"    {name:<26} {seconds[name] * 1e3:10.1f} "
                 f"{memory[name] / benchmarking.MIB:18,.1f}")
  ours_name, ref_name = IMPLEMENTATIONS
  lines += [f"    reference / ours: time {seconds[ref_name] / seconds[ours_name]:.2f}x, "
            f"memory {memory[ref_name] / memory[ours_name]:.2f}x", "",
            f"  {'PASS' if passed else 'FAIL'}: output and gradients "
            f"{'match' if passed else 'do NOT match'} the reference"]
  return passed, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Prints the report; returns 0 when every error is within tolerance, else 1."""
  parser = argparse.ArgumentParser(prog="python -m experiments.kernel_demo",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls (median taken)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  passed, report = run(args.seq_len, repeats=args.repeats)
  print(report)
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
