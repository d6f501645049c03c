#!/usr/bin/env bash
# Everything bench/RESULTS.md marks "not yet measured" on a GPU, in one command, under 8 minutes
# on one GPU. Writes its JSON under bench/results/ (and copies it to $OUT when that is set, as on
# the device machine):
#   1. bench/gpu_steps.py: bf16 and fp16 training steps of the demo Longformer and of a
#      longformer-base-shaped model at 4096 tokens with activation checkpointing (peak GPU
#      memory, tokens/s), and preflight's memory plan against the measured peak;
#   2. the micro-batch search (`python -m qarac_dist.preflight ... --find-batch-size`) on one GPU;
#   3. bench/peers.py --gpu in bf16 and fp16 (qarac_dist, the HF Trainer and Lightning).
#
#   bash bench/gpu.sh [WHEELS_DIR]
#
# On a machine that cannot reach a package index (the device machine), what its Python lacks
# comes from WHEELS_DIR (default .wheels/, filled here by `bash bench/gpu.sh --fetch-wheels`).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-.wheels}
needed=(deepspeed datasets submitit mlflow-skinny hjson msgpack pydantic py-cpuinfo dill multiprocess xxhash
        pyarrow fsspec)
if [ "${1:-}" = "--fetch-wheels" ]; then  # here, with an index: the wheels the device machine lacks
  mkdir -p .wheels
  DS_BUILD_OPS=0 python -m pip wheel -q -c constraints.txt --no-deps -w .wheels "${needed[@]}"
  echo "wheels in .wheels/; carry .wheels to the GPU machine and run: bash bench/gpu.sh .wheels"
  exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
  echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi lists none); run it on a GPU machine" >&2
  exit 2
fi
started=$(date +%s)
python3 -m venv --system-site-packages /tmp/qarac-gpu-venv
. /tmp/qarac-gpu-venv/bin/activate
missing=()
for package in "${needed[@]}"; do
  python -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$package" 2>/dev/null || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  pip install -q --no-index --find-links "$wheels" --no-deps "${missing[@]}"
fi
pip install -q --no-index --no-deps --no-build-isolation -e .
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
mkdir -p bench/results
timeout 300 python bench/gpu_steps.py --out bench/results/gpu_steps.json
timeout 90 python bench/gpu_steps.py --find-batch-size --out bench/results/gpu_batch_size.json
for dtype in bf16 fp16; do
  timeout 120 python bench/peers.py --gpu --dtype "$dtype" --rounds 1 --steps 12 --warmup 2
  cp bench/results/peers_gpu.json "bench/results/peers_gpu_$dtype.json"
done
echo "bench/gpu.sh: done in $(( $(date +%s) - started )) s"
if [ -n "${OUT:-}" ]; then
  cp bench/results/gpu_steps.json bench/results/gpu_batch_size.json bench/results/peers_gpu_*.json "$OUT"/
fi
