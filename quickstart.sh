#!/usr/bin/env bash
# Install what is missing, then run the main job on Fashion-MNIST on this machine's CPUs
# (or one GPU): base training -> candidates -> TWA -> evaluation. Results in runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
exec "${PYTHON:-python3}" jobs/cifar_twa.py --config configs/quickstart.yaml "$@"
