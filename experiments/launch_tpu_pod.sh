#!/usr/bin/env bash
# Launch a gin experiment on every host of a Cloud TPU pod slice.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a GIN_FILE=configs/experiments/quickstart.gin \
#     WORKDIR=gs://my-bucket/runs/quickstart bash experiments/launch_tpu_pod.sh [extra train flags]
#
# Every host runs the same command; `python -m experiments.train` calls
# jax.distributed.initialize() itself when it finds more than one host (on Cloud TPU the
# coordinator is discovered automatically), each process reads its own shard of the data
# (Grain ShardByJaxProcess) and the mesh spans the devices of all hosts. WORKDIR must be
# shared by all hosts (a gs:// path: Orbax writes checkpoints there).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${GIN_FILE:?set GIN_FILE}" "${WORKDIR:?set WORKDIR}"
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url)}
BRANCH=${BRANCH:-$(git rev-parse --abbrev-ref HEAD)}
EXTRA=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  if [ ! -d lclm ]; then git clone --branch $BRANCH $REPO_URL lclm; fi
  cd lclm && git fetch -q && git checkout -q $BRANCH && git pull -q
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python -m experiments.train --distributed=on --gin_file=$GIN_FILE --workdir=$WORKDIR $EXTRA
"
