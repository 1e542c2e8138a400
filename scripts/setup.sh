#!/usr/bin/env bash
# Create or refresh the project virtualenv (.venv) with anygen installed in editable mode.
# Idempotent: re-installs only when pyproject.toml changed. Usage: bash scripts/setup.sh [extra]
#   extra: "data" (bundled real images / video for the main job) or "dev" (tests; includes data).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-dev}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($python --version)"
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.anygen-$extra-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "== installing anygen[$extra] into .venv (torch 2.14.1 comes from this machine's disk)"
  .venv/bin/python -m pip install --quiet --progress-bar off -e ".[$extra]"
  rm -f .venv/.anygen-"$extra"-*
  touch "$stamp"
fi
