#!/usr/bin/env bash
# Run the whole test suite. pytest's exit code 5 (no tests collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
"$BIN/pytest" -q "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test: pytest collected no tests" >&2; exit 1; fi
exit $rc
