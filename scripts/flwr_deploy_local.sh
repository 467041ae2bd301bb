#!/usr/bin/env bash
# Run a Flower App on Flower's Deployment Engine, on this machine: a SuperLink without --simulation and N
# SuperNodes as separate processes (as on separate hosts, but over 127.0.0.1 and without TLS), then stop them all.
#
#   scripts/flwr_deploy_local.sh <app-dir> <num-supernodes> [more `flwr run` arguments]
#   scripts/flwr_deploy_local.sh simulations/cifar100_fedavg 2 \
#       --run-config "dataset='digits' num-clients=2 num-server-rounds=2 out-dir='/abs/out'"
#
# - SuperNode i gets node config "partition-id=i num-partitions=N unlearn-dir='<work>/client-i'": its data
#   partition and its own store directory, as a real SuperNode would be configured (docs/INTEGRATION.md).
# - Own FLWR_HOME (config.toml names the SuperLink "deploy"), own free ports, runtime dependency installation off,
#   offline HF; the venv's bin/ must be on PATH. Work directory: $FLWR_DEPLOY_DIR or a new temp dir (kept: the
#   SuperLink's and SuperNodes' logs, the run's log in run.log). FLWR_DEPLOY_TIMEOUT (s, default 3600) stops a
#   run that has not finished by then.
# - Every SuperLink and SuperNode runs as the leader of its own process group and is stopped by that group
#   (never by name) when the run ends or the script is interrupted.
# - Exit status 0 only for the run status `finished:completed` (`flwr run`'s own exit code says nothing).
# - Each message starts a fresh ClientApp process on its SuperNode (Flower's subprocess isolation), so every round
#   trip pays the App's imports and data loading: seconds per message, where a simulation's actors pay once.
set -euo pipefail

app=${1:?usage: scripts/flwr_deploy_local.sh <app-dir> <num-supernodes> [flwr run arguments]}
nodes=${2:?usage: scripts/flwr_deploy_local.sh <app-dir> <num-supernodes> [flwr run arguments]}
shift 2
case "$nodes" in ''|*[!0-9]*|0) echo "flwr_deploy_local: <num-supernodes> must be a positive integer, got '$nodes'" >&2; exit 2 ;; esac
for tool in flwr flower-superlink flower-supernode; do
  command -v "$tool" >/dev/null || { echo "flwr_deploy_local: $tool not on PATH; activate the venv (PATH=.venv/bin:\$PATH)" >&2; exit 2; }
done

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

work=${FLWR_DEPLOY_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/flwr_deploy.XXXXXX")}
mkdir -p "$work"
work=$(cd "$work" && pwd)
export FLWR_HOME="$work/flwr_home"
mkdir -p "$FLWR_HOME"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

link_port=$(free_port)
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deploy"

[superlink.deploy]
address = "127.0.0.1:$link_port"
insecure = true
TOML

groups=()
stop_all() {
  trap '' INT TERM HUP PIPE  # a second signal must not cut the clean-up short
  local g
  for g in "${groups[@]}"; do kill -- -"$g" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local alive=0
    for g in "${groups[@]}"; do kill -0 -- -"$g" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for g in "${groups[@]}"; do kill -9 -- -"$g" 2>/dev/null || true; done
}
trap stop_all EXIT
for sig in INT TERM HUP PIPE; do
  trap "exit $((128 + $(kill -l "$sig")))" "$sig"
done

setsid flower-superlink --insecure --port "$link_port" --database "$work/state.db" \
  --disable-runtime-dependency-installation > "$work/superlink.log" 2>&1 &
groups+=($!)
for _ in $(seq 1 100); do
  lsof -t -iTCP:"$link_port" -sTCP:LISTEN >/dev/null 2>&1 && break
  sleep 0.2
done
lsof -t -iTCP:"$link_port" -sTCP:LISTEN >/dev/null 2>&1 \
  || { echo "flwr_deploy_local: the SuperLink did not listen on $link_port (see $work/superlink.log)" >&2; exit 1; }

for i in $(seq 0 $((nodes - 1))); do
  setsid flower-supernode --insecure --superlink "127.0.0.1:$link_port" --port "$(free_port)" \
    --node-config "partition-id=$i num-partitions=$nodes unlearn-dir='$work/client-$i'" \
    > "$work/supernode-$i.log" 2>&1 &
  groups+=($!)
done
echo "flwr_deploy_local: SuperLink on 127.0.0.1:$link_port, $nodes SuperNodes; logs in $work"

run_json=$(flwr run "$app" deploy --format json "$@") || {
  echo "flwr_deploy_local: flwr run refused the run: $run_json" >&2; exit 1; }
run_id=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["run-id"])' "$run_json")
echo "flwr_deploy_local: run $run_id started"

run_field() {
  flwr list deploy --run-id "$run_id" --format json 2>/dev/null | python3 -c '
import json, sys
try:
    runs = json.load(sys.stdin).get("runs", [])
except ValueError:
    runs = []
print(runs[0].get(sys.argv[1], "") if runs else "")' "$1" || true
}
status=""
deadline=$((SECONDS + ${FLWR_DEPLOY_TIMEOUT:-3600}))
while :; do
  status=$(run_field status)
  case "$status" in finished:*) break ;; esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "flwr_deploy_local: run $run_id not finished after ${FLWR_DEPLOY_TIMEOUT:-3600} s; stopping it" >&2
    flwr stop "$run_id" deploy >/dev/null 2>&1 || true
    break
  fi
  sleep 2
done
flwr log "$run_id" deploy --show > "$work/run.log" 2>&1 || true
details=$(run_field status-details)
echo "flwr_deploy_local: run status: $status${details:+ ($details)}; the run's log: $work/run.log"
[ "$status" = "finished:completed" ]
