#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (unit + local-Ray integration).
# Without arguments the tests that run whole jobs in subprocesses (each with a Ray of its own:
# tests/tune, tests/jobs, tests/cluster, reproduce.py's smoke run) run beside the rest, in a
# second pytest: both mostly wait for Ray to start, and together they take about two thirds of
# the time one after the other. With arguments: one pytest with them (e.g. -m "not ray", -k NAME).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
PYTEST=("${PYTHON:-python3}" -m pytest -q --durations=15)
if [ "$#" -gt 0 ]; then
    exec "${PYTEST[@]}" "$@"
fi
JOBS=(tests/tune tests/jobs tests/cluster tests/benchmarks/test_reproduce.py)
log=$(mktemp -t twa-ray-job-tests.XXXXXX)
"${PYTEST[@]}" "${JOBS[@]}" > "$log" 2>&1 &
jobs_pid=$!
rest=0
"${PYTEST[@]}" "${JOBS[@]/#/--ignore=}" || rest=$?
jobs_rc=0
wait "$jobs_pid" || jobs_rc=$?
echo
echo "=== the job tests (${JOBS[*]}), run beside the rest ==="
cat "$log"
rm -f "$log"
echo "exit codes: the rest $rest, the job tests $jobs_rc"
[ "$rest" -eq 0 ] && [ "$jobs_rc" -eq 0 ]
