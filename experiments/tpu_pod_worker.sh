#!/usr/bin/env bash
# One TPU VM worker's part of experiments/launch_tpu_pod.sh (run from the repository root
# of the worker's checkout): Python >= 3.11 through uv, the virtual environment, the
# package with the "tpu,gcs" extras, then experiments.train started detached.
#
#   GIN_FILE=... WORKDIR=... RUN_ID=... bash experiments/tpu_pod_worker.sh [extra train flags]
#
# Logs: ~/lclm-logs/$RUN_ID.log (stdout and stderr), copied to
# $WORKDIR/logs/worker-<n>.log: every LOG_SYNC_SECONDS and at the end when WORKDIR is a
# gs:// path, a symbolic link otherwise. ~/lclm-logs/$RUN_ID.pid holds the process group.
set -euo pipefail
: "${GIN_FILE:?set GIN_FILE}" "${WORKDIR:?set WORKDIR}" "${RUN_ID:?set RUN_ID}"
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
LOG_SYNC_SECONDS=${LOG_SYNC_SECONDS:-60}
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
WORKER=$(curl -sf -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
  || hostname)
LOG_DIR=$HOME/lclm-logs
LOG=$LOG_DIR/$RUN_ID.log
REMOTE_LOG=$WORKDIR/logs/worker-$WORKER.log

copy_log() {  # The log to the (gs://) WORKDIR, through epath like every other run file.
  .venv/bin/python -c 'import sys; from etils import epath
epath.Path(sys.argv[2]).write_bytes(epath.Path(sys.argv[1]).read_bytes())' "$LOG" "$REMOTE_LOG" \
    || echo "could not copy $LOG to $REMOTE_LOG" >&2
}

if [ "${1:-}" = "--train" ]; then  # The detached part (below, setsid nohup runs it).
  shift
  # SIGTERM (the stop command) reaches the whole process group: training saves and exits;
  # this script waits for it, then copies the log a last time.
  trap 'echo "SIGTERM: waiting for experiments.train to save and stop"' TERM
  SYNC_PID=
  case "$WORKDIR" in
    gs://*) ( while sleep "$LOG_SYNC_SECONDS"; do copy_log; done ) & SYNC_PID=$! ;;
    *) mkdir -p "$WORKDIR/logs" && ln -sf "$LOG" "$REMOTE_LOG" ;;
  esac
  STATUS=0
  .venv/bin/python -m experiments.train --distributed=on --gin_file="$GIN_FILE" \
    --workdir="$WORKDIR" "$@" || STATUS=$?
  echo "experiments.train exited with status $STATUS"
  if [ -n "$SYNC_PID" ]; then kill "$SYNC_PID" 2>/dev/null || true; copy_log; fi
  exit "$STATUS"
fi

# 1. Python >= 3.11: uv installs a managed CPython (the system Python is left alone).
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
uv python install "$PYTHON_VERSION"
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  rm -rf .venv
  uv venv --python "$PYTHON_VERSION" .venv
fi
# 2. The package for TPU, with gs:// support.
uv pip install --python .venv/bin/python --quiet -e '.[tpu,gcs]'
# 3. Training, detached from this (ssh) session, in its own process group.
mkdir -p "$LOG_DIR"
setsid nohup bash "$SELF" --train "$@" > "$LOG" 2>&1 < /dev/null &
echo "$!" > "$LOG_DIR/$RUN_ID.pid"
echo "worker $WORKER: run $RUN_ID started (process group $!), log $LOG"
