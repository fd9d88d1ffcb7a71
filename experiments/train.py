"""Trains a model from gin files: the project's training entry point.

    python -m experiments.train --gin_file=configs/experiments/quickstart.gin \
        [--gin_file=...] [--gin_param='train.total_steps=100'] --workdir=DIR

Gin files compose (``include``); ``--gin_param`` bindings apply after the files. A binding
gin cannot apply (unknown name, wrong argument, missing ``%gin.REQUIRED`` value) and an
impossible configuration both stop the launch before anything compiles, with a message that
says what to change; the exit code is then 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from lclm import tasks  # noqa: F401  (registers the task configurables)
from lclm.gin_config import REPO_ROOT, ConfigError, parse_gin  # noqa: F401  (re-exported)
from lclm.training import loop


def _on_cluster() -> bool:
  env = os.environ
  return bool(env.get("JAX_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def maybe_initialize_distributed(mode: str) -> None:
  """Calls ``jax.distributed.initialize()`` for multi-host runs.

  ``mode``: "on" always (Cloud TPU pods and SLURM are then discovered by jax), "off" never,
  "auto" when JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) or a
  multi-host TPU_WORKER_HOSTNAMES is set.
  """
  if mode == "off" or (mode == "auto" and not _on_cluster()):
    return
  import jax
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
  for env, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(env):
      kwargs[name] = int(os.environ[env])
  jax.distributed.initialize(**kwargs)


def gin_argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
  """A parser with the flags every gin entry point takes: --gin_file, --gin_param, --workdir."""
  parser = argparse.ArgumentParser(prog=prog, description=description)
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding 'X=Y' (repeatable), applied after the files")
  parser.add_argument("--workdir", required=True, help="run directory (created)")
  return parser


def main(argv=None) -> int:
  parser = gin_argument_parser("python -m experiments.train", __doc__.split("\n")[0])
  parser.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                      help="call jax.distributed.initialize() (auto: when on a cluster)")
  args = parser.parse_args(argv)
  maybe_initialize_distributed(args.distributed)
  try:
    parse_gin(args.gin_file, args.gin_param)
    loop.train(workdir=args.workdir)
  except (ConfigError, loop.ConfigurationError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except loop.NonFiniteLossError as error:
    print(f"error: {error}", file=sys.stderr)
    return 3
  except RuntimeError as error:
    return missing_binding_exit(error)
  return 0


def missing_binding_exit(error: RuntimeError) -> int:
  """Exit code 2 after printing gin's error for a missing ``%gin.REQUIRED`` value (raised
  when the configurable is called, not when the files are parsed); re-raises any other
  RuntimeError."""
  if "Required bindings" not in str(error):
    raise error
  print(f"error: bad gin configuration: {error}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
