#!/usr/bin/env bash
# System parts the integration tests use: the local two-node SLURM cluster (installed and
# started), Debian's chromium with its driver (the MLflow UI check) and Charliecloud's runtime
# (ch-run: trials in a container). Idempotent; needs root or sudo.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v ch-run >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver charliecloud-runtime >/dev/null
fi
bash "$here/../slurm/install.sh"
bash "$here/../slurm/start.sh"
