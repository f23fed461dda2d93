#!/usr/bin/env bash
# Set up .venv if needed (scripts/setup.sh), then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/layers -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
