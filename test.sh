#!/usr/bin/env bash
# Install what is missing (with the optional integrations' extras), then run the whole test suite
# (unit + local-Ray integration).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
# the optional integrations (lightning, transformers): the quickstart never needs them, the tests do
"${PYTHON:-python3}" -m pip install -q -r requirements-extras.txt 2> >(grep -v "is ignored: it is neither" >&2)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec "${PYTHON:-python3}" -m pytest -q --durations=15 "$@"
