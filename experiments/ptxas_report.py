"""Registers and spills of the Pallas Triton kernels of a program, from a CPU-only machine.

    python -m experiments.ptxas_report --op ssd --batch 1 --seq 8192 --heads 8 --head-dim 64 \
        --d-state 128 [--groups 1 --chunk 64 --block-head-dim 64 --dtype bfloat16] \
        [--segments] [--backward] [--warps lclm_ssd_chunk_gradients=8[:2] ...] [--json]
    (--op lightning: lightning attention with d_v = --head-dim and d_k = --d-state)

The op (``implementation="pallas"``; ``--backward``: ``jax.grad`` of a loss, which runs the
forward kernels too) is exported for CUDA; each ``__gpu$xla.gpu.triton`` custom call holds
its kernel's Triton IR, name, num_warps and num_stages. Each distinct kernel is compiled to
PTX for sm_90a by the ``triton`` package (in a subprocess) and by ``ptxas -v --gpu-name
sm_90a``: warps, stages, registers per thread (at most min(255, 65536 / (32 warps)), then
ptxas spills), spill store / load and stack bytes per thread, Triton's shared memory (``*``
past the 227 KiB of a block on sm_90). ``--warps NAME=W[:S]`` compiles NAME with W warps.

Triton is not a project dependency: ``pip install triton==3.6.0`` (jax 0.10.2's Triton IR
compiles with it) here or in another environment given as ``--triton-python`` (it runs the
compiler only). ptxas: ``--ptxas``, ``$PTXAS``, PATH, ``/usr/local/bin/ptxas``, else the
triton wheel's. On a GPU, XLA compiles the IR with its own Triton (counts may differ).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

TRITON_CALL = "__gpu$xla.gpu.triton"
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may have (sm_90)
COLUMNS = ("kernel", "warps", "stages", "regs", "spill_st", "spill_ld", "stack", "smem")


def _program(args):
  """(fn, abstract args) of the op's forward or gradient."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.lightning_attention import lightning_attention
  from pallas_kernels.ssd import ssd
  dtype, f32, sd = jnp.dtype(args.dtype), jnp.float32, jax.ShapeDtypeStruct
  b, t, h, p, n, g = args.batch, args.seq, args.heads, args.head_dim, args.d_state, args.groups
  kw = dict(chunk_size=args.chunk, block_head_dim=args.block_head_dim, implementation="pallas")
  if args.op == "ssd":
    arrays = dict(x=sd((b, t, h, p), dtype), dt=sd((b, t, h), f32), A=sd((h,), f32),
                  B=sd((b, t, g, n), dtype), C=sd((b, t, g, n), dtype))
    forward = lambda a, seg: ssd(**a, dt_softplus=True, segment_ids=seg,
                                 return_final_states=True, **kw)
  else:
    arrays = dict(q=sd((b, t, h, n), dtype), k=sd((b, t, h, n), dtype), v=sd((b, t, h, p), dtype))
    forward = lambda a, seg: lightning_attention(**a, decay=jnp.linspace(0.9, 0.999, h),
                                                 segment_ids=seg, return_final_state=True, **kw)

  def loss(arrays, segment_ids):
    y, final = forward(arrays, segment_ids)
    return jnp.sum(y.astype(f32) ** 2) + jnp.sum(final ** 2)

  seg = sd((b, t), jnp.int32) if args.segments else None
  return (jax.grad(loss) if args.backward else forward), (arrays, seg)


def triton_kernels(fn, fn_args) -> list[dict]:
  """[{name, warps, stages, ir (text)}] per distinct Triton call of jit(fn)(*fn_args)."""
  import jax
  from jax._src.interpreters import mlir
  from jax._src.lib.mlir import ir
  from jaxlib.triton import dialect

  from pallas_kernels._common import dispatch
  with dispatch.target_platform("gpu"):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*fn_args)
  context = mlir.make_ir_context()
  dialect.register_dialect(context)
  kernels, seen = [], set()
  with context:
    def walk(op):
      for inner in (o for region in op.regions for block in region.blocks for o in block):
        yield inner
        yield from walk(inner)
    for op in walk(ir.Module.parse(exported.mlir_module()).operation):
      if (op.operation.name != "stablehlo.custom_call"
          or ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_CALL):
        continue
      config = ir.DictAttr(op.attributes["mhlo.backend_config"])
      text = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm()
      name = ir.StringAttr(config["name"]).value
      if (name, text) not in seen:
        seen.add((name, text))
        kernels.append(dict(name=name, warps=ir.IntegerAttr(config["num_warps"]).value,
                            stages=ir.IntegerAttr(config["num_stages"]).value, ir=text))
  return kernels


def _worker(manifest_path: str) -> int:
  """Prints a JSON row per kernel of the manifest (own process: triton's LLVM and jaxlib's)."""
  import triton
  from triton.backends.compiler import GPUTarget
  manifest = json.loads(pathlib.Path(manifest_path).read_text())
  ptxas = manifest["ptxas"] or triton.knobs.nvidia.ptxas.path
  if not (ptxas and os.access(ptxas, os.X_OK)):
    print("ptxas_report: no ptxas (--ptxas, $PTXAS, PATH, /usr/local/bin/ptxas or the triton "
          f"wheel's: {ptxas}); install the CUDA toolkit's or pass --ptxas.", file=sys.stderr)
    return 4
  for i, k in enumerate(manifest["kernels"]):
    ttir = pathlib.Path(manifest_path).with_name(f"{i}.ttir")
    ttir.write_text(k["ir"])
    compiled = triton.compile(str(ttir), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=k["warps"], num_stages=k["stages"]))
    ptx = pathlib.Path(manifest["ptx_dir"] or ttir.parent, f"{i}_{k['name']}.ptx")
    ptx.write_text(compiled.asm["ptx"])
    log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(re.search(pattern, log).group(1))
    print(json.dumps(dict(
        kernel=k["name"], warps=k["warps"], stages=k["stages"], regs=num(r"Used (\d+) registers"),
        spill_st=num(r"(\d+) bytes spill stores"), spill_ld=num(r"(\d+) bytes spill loads"),
        stack=num(r"(\d+) bytes stack frame"), smem=compiled.metadata.shared)), flush=True)
  return 0


def report(kernels, *, triton_python=None, ptxas=None, ptx_dir=None) -> list[dict]:
  """Rows (COLUMNS) of ``triton_kernels``' dicts; their PTX kept in ``ptx_dir`` if given."""
  python = triton_python or sys.executable
  probe = subprocess.run([python, "-c", "import triton"], capture_output=True, text=True)
  if probe.returncode:
    raise SystemExit(f"ptxas_report: triton is not installed for {python} (not a project "
                     "dependency): pip install triton==3.6.0, or pass --triton-python of an "
                     f"environment that has it ({probe.stderr.strip().splitlines()[-1]}).")
  if ptx_dir:
    os.makedirs(ptx_dir := os.path.abspath(ptx_dir), exist_ok=True)
  if ptxas and not os.access(ptxas, os.X_OK):
    raise SystemExit(f"ptxas_report: --ptxas {ptxas} is not an executable file.")
  ptxas = next((p for p in (ptxas, os.environ.get("PTXAS"), shutil.which("ptxas"),
                            "/usr/local/bin/ptxas") if p and os.access(p, os.X_OK)), None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory(prefix="ptxas_report_") as workdir:
    manifest = pathlib.Path(workdir, "kernels.json")
    manifest.write_text(json.dumps(dict(kernels=kernels, ptxas=ptxas, ptx_dir=ptx_dir)))
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(workdir, "cache"),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([python, "-m", "experiments.ptxas_report", "--worker", str(manifest)],
                         capture_output=True, text=True, env=env, cwd=root)
  if run.returncode:
    raise SystemExit(f"ptxas_report: compiling failed:\n{run.stderr[-4000:]}")
  return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def argument_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m experiments.ptxas_report")
  add = parser.add_argument
  add("--op", choices=("ssd", "lightning"), default="ssd")
  for name, default in (("batch", 1), ("seq", 8192), ("heads", 8), ("head-dim", 64),
                        ("d-state", 128), ("groups", 1), ("chunk", None),
                        ("block-head-dim", None)):
    add(f"--{name}", type=int, default=default)
  add("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
  for flag, text in (("segments", "pass segment_ids"), ("json", "print JSON rows"),
                     ("backward", "jax.grad of a loss instead of the forward")):
    add(f"--{flag}", action="store_true", help=text)
  add("--warps", action="append", default=[], metavar="NAME=W[:S]",
      help="compile kernel NAME with W warps (and S stages)")
  add("--triton-python", help="a Python with triton (default: this one)")
  add("--ptx-dir", help="keep each kernel's PTX in this folder")
  add("--ptxas")
  add("--worker", help=argparse.SUPPRESS)
  return parser


def main(argv=None) -> int:
  args = argument_parser().parse_args(argv)
  if args.worker:
    return _worker(args.worker)
  kernels = triton_kernels(*_program(args))
  names = [k["name"] for k in kernels]
  for override in args.warps:
    match = re.fullmatch(r"(.+)=(\d+)(?::(\d+))?", override)
    if not match or match[1] not in names:
      raise SystemExit(f"ptxas_report: --warps takes NAME=W[:S] with NAME one of {names}, "
                       f"got {override!r}.")
    for k in kernels:
      if k["name"] == match[1]:
        k.update(warps=int(match[2]), stages=int(match[3] or k["stages"]))
  rows = report(kernels, triton_python=args.triton_python, ptxas=args.ptxas, ptx_dir=args.ptx_dir)
  line = lambda r: f"{r['kernel']:<28}" + "".join(f"{r[c]:>9}" for c in COLUMNS[1:])
  if not args.json:
    print(line(dict(zip(COLUMNS, COLUMNS))))
  for row in rows:
    print(json.dumps(row) if args.json else line(row) + "*" * (row["smem"] > SMEM_LIMIT))
  return 0


if __name__ == "__main__":
  sys.exit(main())
