#!/usr/bin/env bash
# Start a team MLflow tracking server. Sweeps point at it with `tracking.uri: http://HOST:PORT`.
#   launch/mlflow_server.sh                          # sqlite file ./mlflow-server/mlflow.db, 127.0.0.1:5000
#   MLFLOW_BACKEND=postgresql://user:pass@dbhost/mlflow MLFLOW_ARTIFACTS=/shared/mlartifacts \
#     MLFLOW_HOST=0.0.0.0 MLFLOW_PORT=5000 launch/mlflow_server.sh
# The server stores runs in the backend and serves artifacts (best models) from the artifact
# root, so jobs on compute nodes need only HTTP access to it. It listens on 127.0.0.1 unless
# MLFLOW_HOST says otherwise: open it to the cluster only where the network is trusted.
set -euo pipefail
dir=${MLFLOW_DIR:-mlflow-server}
mkdir -p "$dir"
backend=${MLFLOW_BACKEND:-sqlite:///$(cd "$dir" && pwd)/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS:-$(cd "$dir" && pwd)/artifacts}
exec mlflow server --backend-store-uri "$backend" --artifacts-destination "$artifacts" --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" "$@"
