#!/usr/bin/env bash
# Create ./.venv with dgopt and its dependencies (idempotent). torch is pinned to the CPU build: a bare "torch"
# requirement can pull a multi-GB CUDA build on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-test}
stamp=".venv/.dgopt-$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The machine image keeps the CPU wheel in /opt/wheels; don't rely on PIP_FIND_LINKS being set.
FL=(); [ -d /opt/wheels ] && FL=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q "${FL[@]}" "torch==2.13.0"
.venv/bin/python -m pip install -q "${FL[@]}" -e ".[$EXTRAS]"
touch "$stamp"
