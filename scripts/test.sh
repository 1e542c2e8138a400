#!/usr/bin/env bash
# The test command: set up .venv with the dev extra, lint, then run the default (fast, CPU) suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
