#!/usr/bin/env bash
# Start a two-node SLURM cluster on this machine: munged, slurmctld, and slurmd twice
# (node1 and node2, ports 17001 and 17002). Idempotent: a running cluster is left as it is.
# Needs root (or sudo). Stop it with slurm/stop.sh.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
here=$(cd "$(dirname "$0")" && pwd)
host=$(hostname -s)
cpus=$(nproc)
# Each slurmd reports this machine's cores and memory; a node may not claim more than that.
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

$SUDO mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
# Dummy GPU devices: character devices with /dev/null's numbers (slurmd refuses plain files); SLURM
# only needs them to exist to hand them out and bind them (no cgroups here: TaskPlugin=task/none).
gpus=/var/lib/qarac-slurm/gpus
for node in node1 node2; do
  $SUDO mkdir -p "$gpus/$node"
  for i in 0 1 2 3; do [ -c "$gpus/$node/gpu$i" ] || { $SUDO rm -f "$gpus/$node/gpu$i"; $SUDO mknod "$gpus/$node/gpu$i" c 1 3; }; done
done
# put_conf FILE: standard input becomes /etc/slurm/FILE; sets changed=1 when it differs from
# before (fed by redirection, not a pipe, so that it runs in this shell).
changed=0
put_conf() {
  $SUDO tee "/etc/slurm/$1.new" >/dev/null
  if ! cmp -s "/etc/slurm/$1.new" "/etc/slurm/$1" 2>/dev/null; then
    $SUDO mv "/etc/slurm/$1.new" "/etc/slurm/$1"
    changed=1
  else
    $SUDO rm -f "/etc/slurm/$1.new"
  fi
}
put_conf gres.conf < <(printf 'NodeName=%s Name=gpu File=%s/%s/gpu[0-3]\n' node1 "$gpus" node1 node2 "$gpus" node2)
put_conf slurm.conf < <(sed -e "s/@HOST@/$host/g" -e "s/@CPUS@/$cpus/g" -e "s/@MEM_MB@/$mem_mb/g" "$here/slurm.conf.in")

if ! pgrep -x munged >/dev/null; then
  $SUDO chown munge:munge /run/munge
  $SUDO runuser -u munge -- /usr/sbin/munged
fi
# A node's resources (its GPUs) change only when its daemons restart; queued jobs are kept.
if [ "$changed" = 1 ]; then
  pgrep -x slurmctld >/dev/null && bash "$here/stop.sh"
fi
if ! pgrep -x slurmctld >/dev/null; then
  $SUDO /usr/sbin/slurmctld
fi
for node in node1 node2; do
  if ! pgrep -f "slurmd -N $node" >/dev/null; then
    $SUDO mkdir -p "/var/spool/slurmd/$node"
    $SUDO /usr/sbin/slurmd -N "$node"
  fi
done

# Wait until both nodes take jobs.
for _ in $(seq 60); do
  if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -ge 2 ]; then
    sinfo -N
    exit 0
  fi
  sleep 1
done
echo "slurm/start.sh: nodes did not come up; see /var/log/slurm/" >&2
sinfo -N >&2 || true
exit 1
