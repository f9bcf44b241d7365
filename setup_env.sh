#!/usr/bin/env bash
# Installs what twa_ray needs and is missing: Python packages (requirements.txt) and,
# where apt exists, the offline Fashion-MNIST data. Sourced by quickstart.sh and test.sh.
set -euo pipefail
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q -r "$(dirname "${BASH_SOURCE[0]}")/requirements.txt"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    echo "installed Fashion-MNIST into /usr/share/datasets/fashion-mnist"
  else
    echo "could not install dataset-fashion-mnist: tests that need it are skipped (under CI=true they fail);" \
         "the quickstart then needs data.download=true (internet) or the data in data/" >&2
  fi
fi
