#!/usr/bin/env bash
# Run the whole pytest suite. pytest's exit 5 ("no tests collected") is a failure here:
# a green run must have run tests.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
