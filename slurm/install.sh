#!/usr/bin/env bash
# Install a real SLURM (Debian's slurmctld, slurmd, client) and munge on this machine.
# Idempotent; needs root (or sudo). Then: slurm/start.sh
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
# The two node names must resolve; both are this machine.
grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" | $SUDO tee -a /etc/hosts >/dev/null
[ -s /etc/munge/munge.key ] || $SUDO mungekey --create --keyfile /etc/munge/munge.key
$SUDO chown munge:munge /etc/munge/munge.key
$SUDO chmod 400 /etc/munge/munge.key
echo "slurm installed: $(dpkg-query -W -f '${Version}' slurmctld)"
