#!/usr/bin/env bash
# Stop the local SLURM cluster started by slurm/start.sh (jobs still queued are kept in its state).
set -uo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
for pattern in "slurmd -N node1" "slurmd -N node2"; do
  $SUDO pkill -f "$pattern"
done
$SUDO pkill -x slurmctld
for _ in $(seq 20); do
  pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || exit 0
  sleep 0.5
done
echo "slurm/stop.sh: daemons still running" >&2
exit 1
