#!/usr/bin/env bash
# Run one training config on N processes of this machine (CPU ranks, or one per GPU).
#   launch/run_local.sh 2 configs/longformer_synthetic.yaml deepspeed.zero_stage=2
# Exits as the ranks did: 0, 2 (a mistake in the config or the data, one line), 3 (stopped by a
# signal, saved: run it again to resume), else the first failing rank's code. torchrun would
# turn every failure into 1.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/run_local.sh NUM_PROCESSES CONFIG [dotted.key=value ...]" >&2
  exit 2
fi
num_processes=$1
shift
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
declare -A rank_of
# Each rank reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (qarac_dist/train/ranks.py).
for ((rank = 0; rank < num_processes; rank++)); do
  RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=$num_processes MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    python -m qarac_dist.train "$@" &
  pids+=($!)
  rank_of[$!]=$rank
done
# SIGTERM, or Ctrl-C (background ranks of a script ignore the terminal's SIGINT), goes on to every
# rank: each saves at the end of its step and exits 3.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
codes=()
first_failed=""
running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  unset ended
  wait -n -p ended "${running[@]}"
  code=$?
  [ -z "${ended:-}" ] && continue  # a trapped signal interrupted the wait
  rank=${rank_of[$ended]}
  codes[$rank]=$code
  still=()
  for pid in "${running[@]}"; do [ "$pid" != "$ended" ] && still+=("$pid"); done
  running=("${still[@]}")
  if [ "$code" -ne 0 ] && [ -z "$first_failed" ]; then
    first_failed=$rank
    # A rank that failed alone can leave its peers in a collective: a minute to notice, then gone.
    (sleep 60 && kill -KILL "${pids[@]}") >/dev/null 2>&1 &  # not holding this script's output open
    killer=$!
  fi
done
[ -n "${killer:-}" ] && kill "$killer" 2>/dev/null
[ -z "$first_failed" ] && exit 0
# Rank 0 speaks for the job (it decides what a stop means); else the first rank that failed.
[ "${codes[0]}" -ne 0 ] && exit "${codes[0]}"
exit "${codes[$first_failed]}"
