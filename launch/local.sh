#!/usr/bin/env bash
# Start N processes of one multi-process JAX job on this machine (the setup the tests use).
#
#   launch/local.sh N -- dlm train --config=configs/quickstart.py:smoke --workdir=runs/local
#
# Each process gets DLM_COORDINATOR_ADDRESS=127.0.0.1:PORT, DLM_NUM_PROCESSES=N and
# DLM_PROCESS_ID=i; on CPU, DLM_LOCAL_DEVICES=K (default 1) fakes K devices per process.
# Output lines are prefixed with the process id.  If one process fails, the others
# are stopped and the script exits with that process's status.
set -uo pipefail
if [ $# -lt 3 ] || [ "$2" != "--" ]; then
  echo "usage: launch/local.sh N -- COMMAND [ARGS...]" >&2
  exit 2
fi
n=$1; shift 2
case "$n" in ''|*[!0-9]*) echo "launch/local.sh: N must be a positive integer, got '$n'" >&2; exit 2;; esac
port=${DLM_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export DLM_COORDINATOR_ADDRESS="127.0.0.1:$port" DLM_NUM_PROCESSES="$n"
if [ -z "${JAX_PLATFORMS:-}" ] || [ "${JAX_PLATFORMS}" = cpu ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DLM_LOCAL_DEVICES:-1}"
fi
pids=()
for ((i = 0; i < n; i++)); do
  ( DLM_PROCESS_ID=$i exec "$@" ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done
status=0
# Poll; the first process that fails stops the others.
while :; do
  alive=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -z "$pid" ] && continue
    if kill -0 "$pid" 2>/dev/null; then alive=1; continue; fi
    wait "$pid"; rc=$?
    pids[$i]=""
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "launch/local.sh: process $i exited with status $rc; stopping the others" >&2
      for p in "${pids[@]}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
    fi
  done
  [ "$alive" -eq 0 ] && break
  sleep 0.5
done
wait
exit "$status"
