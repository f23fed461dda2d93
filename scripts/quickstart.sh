#!/usr/bin/env bash
# The main job: set up .venv if needed, then train a small SOIT on the CPU on a small real
# dataset and evaluate it with detectron2's COCOEvaluator (see README.md, "Quick start").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python tools/quickstart.py "$@"
