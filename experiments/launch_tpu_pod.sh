#!/usr/bin/env bash
# Launch a gin experiment on every host of a Cloud TPU pod slice, detached.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a GIN_FILE=configs/experiments/quickstart.gin \
#     WORKDIR=gs://my-bucket/runs/quickstart bash experiments/launch_tpu_pod.sh [extra train flags]
#
# On every worker (gcloud ... ssh --worker=all) this clones or updates the repository
# (REPO_URL and BRANCH, default this checkout's: push first) into ~/lclm and runs
# experiments/tpu_pod_worker.sh there, which
#   1. bootstraps Python >= 3.11 with uv (a managed CPython; TPU VM images ship 3.10 and
#      setup.py needs 3.11) and creates ~/lclm/.venv with it,
#   2. installs the repository with the "tpu,gcs" extras,
#   3. starts `python -m experiments.train --distributed=on` detached (setsid nohup: the run
#      outlives the ssh session), logging stdout and stderr to ~/lclm-logs/<RUN_ID>.log, copied
#      to WORKDIR/logs/worker-<n>.log (every LOG_SYNC_SECONDS when WORKDIR is gs://).
# Then it prints how to follow the logs and how to stop the run.
#
# Every host runs the same command; `python -m experiments.train` calls
# jax.distributed.initialize() (on Cloud TPU the coordinator is discovered automatically),
# each process reads its own shard of the data (Grain ShardByJaxProcess) and the mesh spans
# the devices of all hosts. WORKDIR must be shared by all hosts (a gs:// path).
#
# Optional: REPO_URL, BRANCH, PROJECT (for gcloud), PYTHON_VERSION (default 3.11),
# RUN_ID (default: the UTC time), LOG_SYNC_SECONDS (default 60).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${GIN_FILE:?set GIN_FILE}" "${WORKDIR:?set WORKDIR}"
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
: "${REPO_URL:?set REPO_URL (this checkout has no origin remote to clone on the workers)}"
BRANCH=${BRANCH:-$(git rev-parse --abbrev-ref HEAD)}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}
LOG_SYNC_SECONDS=${LOG_SYNC_SECONDS:-60}
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
q() { printf '%q' "$1"; }
EXTRA=""
if [ $# -gt 0 ]; then EXTRA=$(printf ' %q' "$@"); fi

REMOTE="set -e
if [ ! -d lclm ]; then git clone --branch $(q "$BRANCH") $(q "$REPO_URL") lclm; fi
cd lclm && git fetch -q && git checkout -q $(q "$BRANCH") && git pull -q
GIN_FILE=$(q "$GIN_FILE") WORKDIR=$(q "$WORKDIR") RUN_ID=$(q "$RUN_ID") \
PYTHON_VERSION=$(q "$PYTHON_VERSION") LOG_SYNC_SECONDS=$(q "$LOG_SYNC_SECONDS") \
  bash experiments/tpu_pod_worker.sh$EXTRA"

"${SSH[@]}" --worker=all --command "$REMOTE"

cat <<EOF

Run $RUN_ID is running on every worker of $TPU_NAME (detached: this terminal may close).
Follow worker 0:
  ${SSH[*]} --worker=0 --command 'tail -f ~/lclm-logs/$RUN_ID.log'
Every worker's log: $WORKDIR/logs/worker-<n>.log
Stop it (SIGTERM: the run saves a checkpoint and exits; launch again with the same WORKDIR to resume):
  ${SSH[*]} --worker=all --command 'kill -TERM -- -\$(cat ~/lclm-logs/$RUN_ID.pid)'
EOF
