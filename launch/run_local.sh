#!/usr/bin/env bash
# Run one training config on N processes of this machine (CPU ranks, or one per GPU).
#   launch/run_local.sh 2 configs/longformer_synthetic.yaml deepspeed.zero_stage=2
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/run_local.sh NUM_PROCESSES CONFIG [dotted.key=value ...]" >&2
  exit 2
fi
num_processes=$1
shift
# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; qarac_dist reads them.
exec torchrun --standalone --nproc_per_node "$num_processes" -m qarac_dist.train "$@"
