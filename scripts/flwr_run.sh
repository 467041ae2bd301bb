#!/usr/bin/env bash
# Run a Flower App with `flwr run` on its own local SuperLink, and stop that SuperLink afterwards.
#
#   scripts/flwr_run.sh <app-dir> [more `flwr run` arguments]
#   scripts/flwr_run.sh simulations/cifar100_fedavg \
#       --run-config "dataset='mnist' out-dir='/abs/out'" \
#       --federation-config "num-supernodes=4 client-resources-num-cpus=1"
#
# - Own FLWR_HOME (a temp dir unless FLWR_HOME is set), own free ports, runtime dependency installation off,
#   offline HF, a short per-run RAY_TMPDIR; the venv's bin/ must be on PATH (flwr starts `flower-superlink`
#   by bare name).
# - `flwr run --stream` exits 0 even when the ServerApp raised, so the run's status is read with
#   `flwr list --format json` (polled until it is `finished:*`). Exit status 0 only for `finished:completed`.
# - The SuperLink outlives `flwr run`: it is stopped by the pid listening on our HTTP API port (flwr 1.41 serves
#   the control API there too), with its process group and its children's groups (the SuperExec leads its
#   own); never by name. Only a SuperLink this script started is stopped.
# - Interrupted (Ctrl-C, SIGTERM, SIGHUP, or a reader that went away: SIGPIPE), it stops `flwr run` and its
#   SuperLink before it exits (status 128 + the signal's number): a killed caller leaves no SuperLink behind.
# - --federation-config defaults to "num-supernodes=4 client-resources-num-cpus=1" (2-core machines).
# - FLWR_RUN_KEEP_HOME=1 keeps a temporary FLWR_HOME (SuperLink log: $FLWR_HOME/local-superlink/).
set -euo pipefail

app=${1:?usage: scripts/flwr_run.sh <app-dir> [flwr run arguments]}
shift

command -v flwr >/dev/null || { echo "flwr_run: flwr not on PATH; activate the venv (PATH=.venv/bin:\$PATH)" >&2; exit 2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

own_home=0
if [ -z "${FLWR_HOME:-}" ]; then
  FLWR_HOME=$(mktemp -d "${TMPDIR:-/tmp}/flwr_home.XXXXXX")
  own_home=1
fi
export FLWR_HOME
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-$(free_port)}
export FLWR_LOCAL_CONTROL_API_PORT=${FLWR_LOCAL_CONTROL_API_PORT:-$(free_port)}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
RAY_TMPDIR=$(mktemp -d /tmp/ray.XXXXXX)  # short: Ray's socket paths are length-limited
export RAY_TMPDIR

listener() {
  lsof -t -iTCP:"$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" -iTCP:"$FLWR_LOCAL_CONTROL_API_PORT" -sTCP:LISTEN -a \
    2>/dev/null | head -n 1 || true
}

if [ -n "$(listener)" ]; then
  echo "flwr_run: something already listens on port $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT or" \
       "$FLWR_LOCAL_CONTROL_API_PORT; pick others" >&2
  exit 2
fi

flwr_pid=""
stop_superlink() {
  local pid children p
  trap '' INT TERM HUP PIPE  # a second signal must not cut the clean-up short
  if [ -n "$flwr_pid" ]; then
    kill "$flwr_pid" 2>/dev/null || true
  fi
  pid=$(listener)
  if [ -n "$pid" ]; then
    children=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
    for p in "$pid" $children; do
      kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    for p in "$pid" $children; do
      kill -9 -- -"$p" 2>/dev/null || kill -9 "$p" 2>/dev/null || true
    done
  fi
  rm -rf "$RAY_TMPDIR"
  if [ "$own_home" = 1 ] && [ "${FLWR_RUN_KEEP_HOME:-0}" != 1 ]; then
    rm -rf "$FLWR_HOME"
  fi
}
trap stop_superlink EXIT
# A signal ends the script through `exit`, so the EXIT trap above stops what it started. `flwr run` runs in the
# background and the script waits on it: bash runs a trap only after its foreground command returns, and
# `flwr run --stream` returns when the run ends.
for sig in INT TERM HUP PIPE; do
  trap "exit $((128 + $(kill -l "$sig")))" "$sig"
done

has_federation_config=0
for arg in "$@"; do
  case "$arg" in --federation-config|--federation-config=*) has_federation_config=1 ;; esac
done
extra=()
if [ "$has_federation_config" = 0 ]; then
  extra=(--federation-config "num-supernodes=4 client-resources-num-cpus=1")
fi

echo "flwr_run: FLWR_HOME=$FLWR_HOME ports http=$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT control=$FLWR_LOCAL_CONTROL_API_PORT"
flwr run "$app" "$@" "${extra[@]}" --stream &
flwr_pid=$!
code=0
wait "$flwr_pid" || code=$?
flwr_pid=""
[ "$code" = 0 ] || echo "flwr_run: flwr run exited $code (the run status decides)" >&2

# The exit code of `flwr run` says nothing; read the run's status.
status=""
for _ in $(seq 1 600); do
  status=$(flwr list --format json 2>/dev/null | python3 -c '
import json, sys
try:
    runs = json.load(sys.stdin).get("runs", [])
except ValueError:
    runs = []
print(runs[-1]["status"] if runs else "")') || status=""
  case "$status" in finished:*) break ;; esac
  sleep 1
done
details=$(flwr list --format json 2>/dev/null | python3 -c '
import json, sys
try:
    runs = json.load(sys.stdin).get("runs", [])
except ValueError:
    runs = []
print(runs[-1].get("status-details", "") if runs else "")' || true)
echo "flwr_run: run status: ${status:-unknown}${details:+ ($details)}"
[ "$status" = "finished:completed" ]
