#!/usr/bin/env bash
# The README's test command: installs what it needs into ./.venv, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
exec .venv/bin/python -m pytest "$@"
