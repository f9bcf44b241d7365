#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (unit + local-Ray integration).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec "${PYTHON:-python3}" -m pytest -q --durations=15 "$@"
