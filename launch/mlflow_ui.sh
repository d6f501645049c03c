#!/usr/bin/env bash
# Open the MLflow UI on the default store of sweeps: sqlite:///mlflow.db in this directory.
#   launch/mlflow_ui.sh            # then browse http://127.0.0.1:5000/#/experiments, pick the sweep, "Runs"
#   MLFLOW_DB=path/to/mlflow.db MLFLOW_PORT=5001 launch/mlflow_ui.sh
set -euo pipefail
db=${MLFLOW_DB:-mlflow.db}
if [ ! -f "$db" ]; then
  echo "launch/mlflow_ui.sh: $db not found; run a sweep first (python -m qarac_dist.sweep configs/grid.yaml)" >&2
  exit 2
fi
exec mlflow ui --backend-store-uri "sqlite:///$(cd "$(dirname "$db")" && pwd)/$(basename "$db")" \
  --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" "$@"
