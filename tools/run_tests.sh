#!/usr/bin/env bash
# Runs the test suite; pytest's exit code 5 (no test collected) is a failure here.
#   tools/run_tests.sh PYTHON [pytest args...]      TESTS="paths" overrides the default "tests"
set -u
PY=${1:-python3}; shift || true
# shellcheck disable=SC2086
"$PY" -m pytest ${TESTS:-tests} -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
