#!/usr/bin/env bash
# Launch a gin experiment on one host with several GPUs (one process drives all of them),
# or on several GPU hosts (one process per host).
#
# One host:   GIN_FILE=configs/experiments/quickstart.gin WORKDIR=/tmp/run \
#               bash experiments/launch_multi_gpu.sh [extra train flags]
# Many hosts: run the same command on each host with
#               JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
#             set; `python -m experiments.train` then calls jax.distributed.initialize(),
#             and each process reads its own shard of the data. WORKDIR must be shared.
#
# The mesh spans every visible GPU: pick the layout with a mesh file, e.g.
#   --gin_file=configs/mesh/fsdp.gin   (parameters split over all GPUs)
# and restrict GPUs with CUDA_VISIBLE_DEVICES.
set -euo pipefail
: "${GIN_FILE:?set GIN_FILE}" "${WORKDIR:?set WORKDIR}"
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q -e '.[gpu]'
# Let XLA use most of the GPU memory up front; Pallas kernels need no extra flags.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec .venv/bin/python -m experiments.train --gin_file="$GIN_FILE" --workdir="$WORKDIR" "$@"
