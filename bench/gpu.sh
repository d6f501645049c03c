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
#   4. (stage `load` only) a local sweep of two trials of the demo on the GPU, micro batch 2 and 8,
#      whose parent run's GPU-load and GPU-hours plots the README shows.
#
#   bash bench/gpu.sh [WHEELS_DIR] [steps|peers|load]
#
# With a stage, only 1-2 (steps), 3 (peers) or 4 (load): commands of under 10 minutes each, as
# the device machine allows, a later one on the still-warm machine.
# On a machine that cannot reach a package index (the device machine), what its Python lacks
# comes from WHEELS_DIR (default .wheels/, filled here by `bash bench/gpu.sh --fetch-wheels`).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-.wheels}
# What the device machine's image (Python 3.12, torch, transformers, pyarrow, ... already there:
# /work/.library/device/KINDS.md) lacks of what the benchmarks import, at constraints.txt's versions.
lacking=(hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess submitit optuna
         cmaes colorlog alembic sqlalchemy mako mlflow-skinny mlflow-tracing cachetools gitpython gitdb smmap
         importlib-metadata opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
         opentelemetry-proto python-dotenv sqlparse databricks-sdk google-auth pyasn1 pyasn1-modules fastapi starlette
         uvicorn sniffio cryptography cffi pycparser)
if [ "${1:-}" = "--fetch-wheels" ]; then  # here, with an index: the wheels the device machine lacks
  mkdir -p .wheels
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -c constraints.txt -d .wheels "${lacking[@]}"
  DS_BUILD_OPS=0 python -m pip wheel -q --no-deps -c constraints.txt -w .wheels deepspeed  # an sdist: built here
  echo "wheels in .wheels/; carry .wheels to the GPU machine and run: bash bench/gpu.sh .wheels"
  exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
  echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi lists none); run it on a GPU machine" >&2
  exit 2
fi
started=$(date +%s)
stage=${2:-all}
# Into the Python that has the machine's torch (a venv of its own would not see it when that
# Python is itself a venv, as on the device machine): run this where that may change.
python3 -m pip install -q --no-index --no-deps "$wheels"/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
mkdir -p bench/results
keep() {  # each result to $OUT as soon as it exists (the device machine's), so a later step's overrun loses only its own
  if [ -n "${OUT:-}" ] && [ -f "$1" ]; then cp "$1" "$OUT"/; fi
}
if [ "$stage" = load ]; then
  work=$(mktemp -d)
  cat > "$work/load.yaml" <<EOF
name: gpu_load
base: $PWD/configs/longformer_synthetic.yaml
runs_dir: $work/runs
executor: local
set: {training.max_steps: 100, evaluation.every_steps: 50, data.synthetic.num_validation: 64,
      data.synthetic.num_train: 1000, early_stopping.patience: null, tracking.system_metrics_every_s: 1,
      output.export_best: false, data.cache_dir: $work/cache}
grid: {training.micro_batch_size: [2, 8]}
resources: {gpus_per_node: 1, max_parallel: 1, time_min: 10}
tracking: {uri: "sqlite:///$work/mlflow.db"}
EOF
  timeout 170 python3 -m qarac_dist.sweep "$work/load.yaml" --no-preflight || true
  for png in load usage; do keep "$work/runs/gpu_load/$png.png"; done
  python3 -m qarac_dist.status "$work/runs/gpu_load" | tail -3 || true
  echo "bench/gpu.sh: done in $(( $(date +%s) - started )) s"
  exit 0
fi
if [ "$stage" != peers ]; then
  # The node-load sampler on a real GPU (track/system_metrics.py): the trial's device found through NVML.
  CUDA_VISIBLE_DEVICES=0 python3 -c "import json; from qarac_dist.track.system_metrics import Sampler; \
print(json.dumps(Sampler(0).sample()))" | tee bench/results/gpu_sampler.json || true
  keep bench/results/gpu_sampler.json
  # gpu_steps.py writes its JSON after each run (90 s each at most), so this limit loses only the last.
  timeout 250 python3 bench/gpu_steps.py --out bench/results/gpu_steps.json || true
  keep bench/results/gpu_steps.json
  timeout 150 python3 bench/gpu_steps.py --find-batch-size --out bench/results/gpu_batch_size.json || true
  keep bench/results/gpu_batch_size.json
fi
if [ "$stage" != steps ]; then
  rounds=$([ "$stage" = peers ] && echo 2 || echo 1)  # alone, two rounds of bf16 (a ratio of runs side by side)
  dtypes=$([ "$stage" = peers ] && echo bf16 || echo "bf16 fp16")
  for dtype in $dtypes; do
    timeout $((165 * rounds)) python3 bench/peers.py --gpu --dtype "$dtype" --rounds "$rounds" --steps 12 --warmup 2 \
      || continue
    cp bench/results/peers_gpu.json "bench/results/peers_gpu_$dtype.json"
    keep "bench/results/peers_gpu_$dtype.json"
  done
fi
echo "bench/gpu.sh: done in $(( $(date +%s) - started )) s"
