#!/usr/bin/env bash
# The main job: set up .venv, then run the quick start (outputs under outputs/quickstart/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh data
exec .venv/bin/anygen quickstart --out outputs/quickstart "$@"
